"""Analysis after training.

evaluate   the one evaluation entry point: `evaluate(model_or_checkpoint, data, cams, options)` for a
           TappedModel, checkpoint or shipped name on a folder, dataset object or the training data:
           accuracy, macro-F1, per-class, ATT-COS, CAM-COS, optionally ROAD faithfulness (CLI)
interpret  layer attention and CAMs (pytorch-grad-cam) against AU maps, faithfulness, overlays;
           the CAM method registry (`register_cam`) and `CAMSettings`, the CAM parameters in one object
explain    per-AU evidence for a prediction, over photos and folders (CLI); `ExplainSettings`
explore    interactive per-sample views for JupyterLab; `ExploreSettings`
"""
