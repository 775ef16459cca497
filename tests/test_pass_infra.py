import pytest

from qcompile.errors import PassError
from qcompile.passes import FoldBatchNormPass, Pass, PassManager, PassResult
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
