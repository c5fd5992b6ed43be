"""retina_jax: RetinaNet and the focal loss (Lin et al., 2017) in JAX/Flax.

Glossary used in every docstring and shape comment:
  B  images in a batch (the global batch inside jit)
  H, W  canvas height and width in pixels (fixed per run, divisible by 128)
  A  anchors of one image over all pyramid levels, in the order of anchors.py
  K  object classes (80 for COCO); there is no background class
  M  ground-truth boxes per image after padding (config data.max_boxes)
  D  detections kept per image after post-processing (config postprocess.max_detections)

Box convention inside the package: float32 absolute pixels, (x1, y1, x2, y2),
continuous coordinates (a box from x1 to x2 has width x2 - x1, no +1).
Conversions happen at the data boundary only (boxes.py). Padded ground truth has
class -1 and box (0, 0, 0, 0).
"""

import os

# On a CPU with AVX-512 TensorFlow announces its oneDNN graph rewrites on stderr at import, before
# its log level applies, which would break the command-line tools' one-line errors. The package
# runs only tf.data on TensorFlow (no TF matmul or convolution, which those rewrites are for), so
# they are off unless the user says otherwise. Here, so every entry point sets it before TF loads.
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

__version__ = "0.1.0"
