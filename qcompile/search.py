"""TEMPORARY (replaced by the mixed-precision branch)."""


def quantize_auto(auto, model, example_inputs, calibration, example_kwargs, quantize_with):
    if auto.searches:
        return auto.search(model, example_inputs, calibration, example_kwargs, quantize_with)
    recipe, info = auto.resolve(model, example_inputs, calibration, example_kwargs)
    qmodel = quantize_with(recipe)
    qmodel.report.mixed_precision = info
    return qmodel
