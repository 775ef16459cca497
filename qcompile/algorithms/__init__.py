"""Weight algorithms as plain tensor math: given a weight, its :class:`~qcompile.spec.QuantSpec` and
statistics of the layer's inputs, choose quantized weights better than round-to-nearest.

* :mod:`qcompile.algorithms.common`: :class:`~qcompile.algorithms.common.InputStats` (the running
  ``XᵀX`` both algorithms read), :func:`~qcompile.algorithms.common.fake_quantize` on the stored
  grid, :func:`~qcompile.algorithms.common.unsupported`.
* :mod:`qcompile.algorithms.gptq`: GPTQ (:func:`~qcompile.algorithms.gptq.gptq_quantize`).
* :mod:`qcompile.algorithms.awq`: AWQ's per input channel scale search and per group clipping
  search.

The layer: these modules import only :mod:`~qcompile.errors`, :mod:`~qcompile.formats`,
:mod:`~qcompile.spec`, :mod:`~qcompile.ops` and :mod:`~qcompile.observers`, never the passes or
torch.fx, so they run (and are tested) on bare tensors. Walking a graph and editing it is
:class:`~qcompile.passes.weight_algorithms.ApplyWeightAlgorithmPass`'s job.
"""
