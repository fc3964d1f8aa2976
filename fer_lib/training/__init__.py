"""Training: the composite loss and the loop that minimises it.

losses   CE + lambda * sum over tapped layers of (1 - cos(attention, AU map)) and its variants
step     the one training step (loss hook -> non-finite policy -> AMP backward -> optimizer + LR schedule),
         and the one optimizer/schedule builder; continual and ssl override the loss hook
runs     run lock, run identity, RNG state, DDP helpers
train    TrainConfig -> data -> model -> loop (checkpoints, resume, DDP) -> final evaluation
presets  named recipes (FER2013 lite0, the reference README's ResNet50 recipe)
"""
