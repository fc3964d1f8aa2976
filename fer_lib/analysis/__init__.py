"""Analysis after training.

evaluate   a checkpoint on a dataset split: accuracy, macro-F1, ATT-COS, CAM-COS (CLI)
interpret  layer attention and CAMs (pytorch-grad-cam) against AU maps, faithfulness, overlays
explain    per-AU evidence for a prediction, over photos and folders (CLI)
explore    interactive per-sample views for JupyterLab
"""
