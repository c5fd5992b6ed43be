"""torchvision's retinanet_resnet50_fpn (v1) as a config: evaluate its published weights, or retrain its recipe.

What differs from configs/base.py (the paper), all from torchvision's code:
  P6 from P5 instead of C5; anchor sizes truncated to int with rounded corners and
  cell offset 0; L1 box loss; 300 detections per image; 26 epochs with steps at 16
  and 22 and a 1000-iteration warm-up from lr / 1000. Matching (0.5 / 0.4, low-quality
  matches), focal loss (0.25, 2), box coder, frozen BatchNorm with stem + layer1
  frozen, 800 / 1333 resizing and flip are the same as the paper's.
torchvision normalizes each image's loss by its own positives and averages over
images; the closest the config offers is 'global' (the batch's positives).

Parameters: 33,786,804 with our 80 classes; torchvision's 91-class head (COCO ids,
0 = background) has 34,014,999, its documented count. The loader picks the 80 used
COCO ids from the 91 and reorders torchvision's ratio-major anchors to ours.

Evaluate the published weights (box AP 36.4 on val2017 in torchvision's docs):

  python -m retina_jax.main --config configs/torchvision_retinanet.py --workdir /tmp/tv_r50 \
      --config.mode=eval --config.data.data_dir=$HOME/tensorflow_datasets \
      --config.model.pretrained=/path/retinanet_resnet50_fpn_coco-eeacb38b.pth

Reading .pth needs PyTorch; without it, convert once where torch is installed:
  python -c "import torch, safetensors.torch as s; \
      s.save_file(torch.load('retinanet_resnet50_fpn_coco-eeacb38b.pth'), 'tv_retinanet.safetensors')"
and pass the .safetensors file instead.
"""

import math

from configs import base

_COCO_TRAIN_IMAGES = 117266  # train2017 images with annotations (torchvision drops the others)


def get_config(arg=None):
  c = base.get_config(arg)
  c.model.p6_from = 'p5'  # LastLevelP6P7(256, 256): P6 from P5
  c.model.pretrained_kind = 'retinanet'
  c.anchors.integer_sizes = True  # sizes (32, 40, 50), ... truncated, corners rounded
  c.anchors.offset = 0.0  # anchor centres on the cell corners
  c.data.min_size = 800
  c.data.max_size = 1333
  c.loss.box = 'l1'
  c.loss.normalizer = 'global'
  c.postprocess.score_thresh = 0.05
  c.postprocess.topk_per_level = 1000
  c.postprocess.nms_iou = 0.5
  c.postprocess.max_detections = 300  # RetinaNet(detections_per_img=300)
  # torchvision's detection reference: 8 GPUs x 2 images, lr 0.01, 26 epochs, /10 at epochs 16 and 22.
  steps_per_epoch = math.ceil(_COCO_TRAIN_IMAGES / c.train.batch_size)
  c.train.steps = 26 * steps_per_epoch
  c.optim.decay_steps = (16 * steps_per_epoch, 22 * steps_per_epoch)
  c.optim.warmup_steps = 1000
  c.optim.warmup_factor = 1.0 / 1000
  return c
