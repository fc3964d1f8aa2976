"""Training: the composite loss and the loop that minimises it.

losses   CE + lambda * sum over tapped layers of (1 - cos(attention, AU map)) and its variants
train    TrainConfig -> data -> model -> loop (checkpoints, resume, DDP) -> final evaluation
presets  named recipes (FER2013 lite0, the reference README's ResNet50 recipe)
"""
