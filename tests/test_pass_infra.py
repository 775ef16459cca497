import pytest

from qcompile.errors import PassError
from qcompile.passes import FoldBatchNormPass, Pass, PassManager, PassResult
from qcompile.passes.infra import Stage
from qcompile.capture import capture


class Boom(Pass):
    name = "boom"

    def call(self, gm):
        raise IndexError("deep inside")


class Noop(Pass):
    name = "noop"

    def call(self, gm):
        return PassResult(gm, False)


def test_manager_names_failing_pass_and_those_before(tiny_cnn):
    model, batches = tiny_cnn
    gm = capture(model, batches[0]).graph_module
    with pytest.raises(PassError) as e:
        PassManager([Noop(), FoldBatchNormPass(), Boom()])(gm)
    msg = str(e.value)
    assert "pass 'boom' failed" in msg and "IndexError" in msg and "noop, fold_batch_norm" in msg


def test_manager_dumps_graph_after_each_pass(tiny_cnn, tmp_path):
    model, batches = tiny_cnn
    gm = capture(model, batches[0]).graph_module
    pm = PassManager([Noop(), FoldBatchNormPass()], dump_dir=str(tmp_path))
    result = pm(gm)
    assert result.modified
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00_noop.txt", "01_fold_batch_norm.txt"]
    assert "batch_norm" in (tmp_path / "00_noop.txt").read_text()
    assert "batch_norm" not in (tmp_path / "01_fold_batch_norm.txt").read_text()
    assert pm.log == [("noop", False), ("fold_batch_norm", True)]


def test_one_run_across_calls_names_every_earlier_stage(tiny_cnn):
    """prepare and convert continue one run: a failure later names the stages of the earlier call."""
    model, batches = tiny_cnn
    gm = capture(model, batches[0]).graph_module
    pm = PassManager([Noop(), Stage(FoldBatchNormPass(), "capture"), Stage(Boom(), "convert")])
    pm.run(gm, until="convert")
    assert [s.name for s in pm.pending] == ["boom"]
    with pytest.raises(PassError, match=r"passes run before it: noop, fold_batch_norm\)"):
        pm.run(gm)


def test_stage_condition_skips_and_is_logged(tiny_cnn):
    model, batches = tiny_cnn
    gm = capture(model, batches[0]).graph_module
    pm = PassManager([Stage(Boom(), "never", when=lambda g: False), Noop()])
    pm(gm)
    assert [(r.name, r.result is None) for r in pm.records] == [("boom", True), ("noop", False)]
    assert pm.log == [("noop", False)] and set(pm.timings()) == {"never", "noop"}
    # a stage skipped by its condition has no result; one that ran is found by name
    assert pm.result("boom") is None and pm.result("noop") is pm.records[1].result and pm.result("other") is None


def test_quantize_dumps_every_stage_with_one_numbering(tiny_block, tmp_path):
    """Every pass of the pipeline, smoothing and conversion included, dumped once, numbered in order."""
    import qcompile

    model, batches = tiny_block
    q = qcompile.quantize(model, "w8a8", batches[0], calibration=batches, dump_dir=str(tmp_path))
    files = sorted(p.name for p in tmp_path.iterdir())
    numbers = [int(f.split("_", 1)[0]) for f in files]
    assert numbers == sorted(set(numbers))
    names = [f.split("_", 1)[1][:-4] for f in files]
    assert names == ["capture", "fold_batch_norm", "decompose_recurrent", "normalize_linear", "annotate",
                     "insert_channel_stats", "calibrate",
                     "apply_smoothing", "insert_observers", "calibrate", "convert", "own_tensors"]
    assert numbers == list(range(len(files)))
    assert list(q.report.timings_s) == ["capture", "smoothing", "observe", "calibrate", "convert", "report"]
