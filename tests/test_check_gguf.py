"""qcompile.check on a GGUF file: the contract record and smoke tensors travel in its metadata;
llama.cpp reloads it and the smoke logits are compared with the recorded parity; a corrupted scale
block (re-written consistently, so the file still loads) fails the parity by name."""
import importlib.util

import numpy as np
import pytest

import qcompile
from qcompile.errors import ParityError

pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama_cpp (llama-cpp-python) is not installed: pip install 'qcompile[gguf]'")
from test_backend_gguf import PROMPTS, _ids, llama, tokenizer  # noqa: E402,F401  - the tiny Llama and its BPE


@pytest.fixture(scope="module")
def saved(llama, tokenizer, tmp_path_factory):  # noqa: F811
    ids = _ids(tokenizer, PROMPTS[0])
    q = qcompile.quantize(llama, "gguf-q8_0", ids, calibration=[ids], example_kwargs={"use_cache": False},
                          report_samples=1)
    art = qcompile.lower(q, backend="gguf", config=llama.config, tokenizer=tokenizer, tokenizer_pre="default")
    return art.save(tmp_path_factory.mktemp("gguf") / "m.gguf")


def test_record_travels_and_check_passes(saved):
    from qcompile.backends.gguf.runtime import read_contract

    contract, smoke = read_contract(saved)
    assert contract["recipe"]["name"] == "gguf-q8_0" and contract["runtime"].startswith("llama.cpp")
    assert 0 < contract["parity"]["max_rel"] < 0.05 and "input.0" in smoke
    result = qcompile.check(saved)
    assert result.passed and result.kind == "gguf"


def test_corrupted_block_fails_the_parity(saved, tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    path.write_bytes(saved.read_bytes())
    reader = gguf.GGUFReader(str(path), "r+")   # memory-mapped: edits land in the file
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    blocks = np.asarray(t.data).reshape(-1, 34)   # Q8_0: float16 scale + 32 int8 codes
    blocks[:8, :2] = np.frombuffer(np.float16(4.0).tobytes(), np.uint8)   # 8 blocks' scales set to 4.0
    del reader
    with pytest.raises(ParityError, match="differ from the recorded reference outputs"):
        qcompile.check(path)
