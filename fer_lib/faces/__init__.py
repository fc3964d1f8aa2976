"""Faces: from a photo to AU heatmaps.

landmarks  face detection (MediaPipe full-range detector) and FaceMesh's 478 points, landmark
           schemes as adapters to named facial anchors, the on-disk landmark cache, image reading
au         the AU codebook (expression -> AUs), AU regions on anchors, heatmap rendering
compound   compound expressions as unions of basic ones (codebook extension)
"""
