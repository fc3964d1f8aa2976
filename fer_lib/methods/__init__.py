"""The hosted methods of the related papers.

continual  continual compound-expression learning: KD + Predictive Sorting Memory Replay, few-shot
ssl        ContraWarping: BYOL-style pretraining with local-warp negatives, probes and retrieval
warps      the global transforms and local (uniform or AU-aware) warps that ssl uses
(LNLAttenNet is a model family: fer_lib.models.lnlattennet.)
"""
