"""RetinaNet as the paper trains it: ResNet-50-FPN, focal loss, COCO, 90k iterations.

Lin, Goyal, Girshick, He, Dollar, "Focal Loss for Dense Object Detection" (arXiv 1708.02002).
Every setting cites the paper (section 3-5) or, where the paper is silent, the
Detectron code that produced its numbers. Table files derive from this one and change
only what their table varies; `tests/test_configs.py` checks that they add no new keys.

  python -m retina_jax.main --config configs/base.py --workdir /tmp/r50 \
      --config.data.data_dir=$HOME/tensorflow_datasets

Paper, ResNet-50-FPN at 600 px (Table 1b, gamma 2): AP 34.0 / AP50 52.5 / AP75 36.5.
"""

import math

import ml_collections
from ml_collections import config_dict

from retina_jax.data import buckets


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = 'train_eval'  # 'train' | 'eval' | 'train_eval'
  c.seed = 0

  # Data. 'coco' reads tfds coco/2017; 'shapes' reads the built-in synthetic set.
  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'coco'  # a key of DATASETS in retina_jax/data/pipeline.py
  c.data.data_dir = config_dict.placeholder(str)  # tfds data_dir
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.annotation_file = config_dict.placeholder(str)  # instances_val2017.json, optional
  # Fixed padded (H, W), divisible by 128 (P7's stride), for data.use_buckets = False. Square,
  # so that portrait images get the same 800/1333 scale as landscape ones instead of being shrunk.
  c.data.canvas = (1408, 1408)
  c.data.min_size = 800  # shorter side; sec. 5: 800 px for the final models, 600 for ablations
  c.data.max_size = 1333  # longer side cap (Detectron)
  # Size buckets (data/buckets.py): each image is padded to the smallest of these canvases that
  # holds it at min_size/max_size, not to the square canvas, so a 640 x 480 COCO image costs
  # 1.2x its pixels instead of 2.3x. One compile per bucket. They must hold every image at the
  # scale (checked); a table at another scale proposes its own. False: one canvas, data.canvas.
  c.data.use_buckets = True
  c.data.buckets = buckets.propose(c.data.min_size, c.data.max_size)
  c.data.scale_jitter = (1.0, 1.0)  # multiplies min_size at train time; sec. 5.2 uses jitter for Table 2
  c.data.flip = True  # sec. 4.1: horizontal flip is the only augmentation
  c.data.max_boxes = 100  # M: ground truth padded to this many boxes
  c.data.mean = (123.675, 116.28, 103.53)  # torchvision ImageNet mean, 0-255 RGB
  c.data.std = (58.395, 57.12, 57.375)  # torchvision ImageNet std
  c.data.shuffle_buffer = 1024
  c.data.eval_images = 0  # 0: the whole eval split
  # Built-in synthetic dataset (data.dataset = 'shapes'); ignored for COCO.
  c.data.shapes = ml_collections.ConfigDict()
  c.data.shapes.image_size = 256
  c.data.shapes.num_train = 2000
  c.data.shapes.num_val = 200
  c.data.shapes.max_objects = 24
  c.data.shapes.min_object_size = 8
  c.data.shapes.seed = 0
  # False: square images of image_size. True: COCO-like sizes and aspect ratios, the longer side
  # image_size for 640 px COCO images (buckets.COCO_LIKE_SIZES), so that runs use several buckets.
  c.data.shapes.varied_sizes = False

  # Anchors (sec. 4, "Anchors"): P3-P7, areas 32^2..512^2, 3 scales x 3 ratios.
  c.anchors = ml_collections.ConfigDict()
  c.anchors.levels = (3, 4, 5, 6, 7)
  c.anchors.sizes = (32.0, 64.0, 128.0, 256.0, 512.0)
  c.anchors.scales_per_octave = 3  # scales 2^(i/3), i = 0, 1, 2
  c.anchors.ratios = (0.5, 1.0, 2.0)  # height / width
  c.anchors.offset = 0.5  # cell centre; Detectron is ~0.5, detectron2 0.0
  c.anchors.integer_sizes = False  # torchvision v1: sizes truncated to int, corners rounded to pixels

  # Network (sec. 4): ResNet-FPN, two subnets of 4 convs x 256.
  c.model = ml_collections.ConfigDict()
  c.model.backbone = 'resnet50'  # a key of BACKBONES in retina_jax/model/resnet.py
  c.model.backbone_width = 64  # stem width; smaller values give the tiny CPU variants
  c.model.freeze_bn = True  # BatchNorm statistics and affine frozen (sec. 4.1, Detectron)
  c.model.freeze_at = 2  # stem and res2 frozen (Detectron FREEZE_AT = 2); 0 trains everything
  c.model.fpn_width = 256
  c.model.p6_from = 'c5'  # 'c5' (paper) | 'p5' (torchvision)
  c.model.head_width = 256
  c.model.head_convs = 4
  c.model.head_norm = 'none'  # 'none' (paper) | 'group'
  c.model.prior_prob = 0.01  # sec. 4.1: b = -log((1 - pi) / pi)
  c.model.num_classes = 80
  c.model.dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16'; parameters stay float32
  c.model.pretrained = config_dict.placeholder(str)  # torchvision .pth/.safetensors/.npz
  c.model.pretrained_kind = 'backbone'  # an ImageNet ResNet; LOADERS in model/torchvision_weights.py

  # Assignment (sec. 4): IoU >= 0.5 positive, < 0.4 negative, between ignored.
  c.matching = ml_collections.ConfigDict()
  c.matching.fg_iou = 0.5
  c.matching.bg_iou = 0.4
  c.matching.low_quality = True  # Detectron: each GT claims its best anchors

  c.box_coder = ml_collections.ConfigDict()
  c.box_coder.weights = (1.0, 1.0, 1.0, 1.0)  # Detectron RetinaNet: no scaling of (dx, dy, dw, dh)
  c.box_coder.clamp = math.log(1000.0 / 16)  # dw, dh clamp at decode (Detectron)

  # Losses (sec. 3, 4). cls, box and normalizer take the keys of CLS_LOSSES, BOX_LOSSES and
  # NORMALIZERS in retina_jax/losses.py.
  c.loss = ml_collections.ConfigDict()
  c.loss.cls = 'focal'  # sec. 3; OHEM for Table 1d
  c.loss.alpha = 0.25  # sec. 3.2 / Table 1b; negative means no alpha weighting
  c.loss.gamma = 2.0  # Table 1b
  c.loss.box = 'smooth_l1'  # Detectron's; detectron2 and torchvision use L1
  c.loss.beta = 0.11  # smooth L1 (Detectron)
  c.loss.box_weight = 1.0
  c.loss.normalizer = 'global'  # #positives of the global batch; detectron2 uses a running average
  c.loss.normalizer_momentum = 0.9
  c.loss.normalizer_init = 100.0
  c.loss.ohem_batch = 128  # anchors kept per image (Table 1d)
  c.loss.ohem_nms = 0.7
  c.loss.ohem_neg_pos = 0.0  # 0: no cap; 3.0: at most 3 negatives per positive ("OHEM 1:3")

  # Inference (sec. 4): > 0.05, top 1000 per level, class-wise NMS 0.5, 100 per image.
  c.postprocess = ml_collections.ConfigDict()
  c.postprocess.score_thresh = 0.05
  c.postprocess.topk_per_level = 1000
  c.postprocess.nms_iou = 0.5
  c.postprocess.max_detections = 100

  # Optimisation (sec. 4.1): SGD, 16 images, lr 0.01, 90k its, /10 at 60k and 80k.
  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 0.01  # at base_batch images; scaled linearly with train.batch_size at run time
  c.optim.base_batch = 16
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.warmup_steps = 500  # Detectron: 500 its linear warm-up from lr / 3
  c.optim.warmup_factor = 1.0 / 3
  c.optim.decay_steps = (60000, 80000)
  c.optim.decay_factor = 0.1
  c.optim.grad_clip = 0.0  # 0: off (paper)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16  # global, over all devices and hosts
  c.train.steps = 90000
  # Multiplies steps, warm-up and decay steps at run time: toy runs keep the shape of the schedule.
  c.train.schedule = 1.0
  c.train.log_every = 20
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3
  c.train.eval_every = 0  # 0: evaluate only at the end (mode train_eval)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 8  # global
  c.eval.visualize = 4  # images drawn with their detections after evaluation
  c.eval.checkpoint_step = -1  # mode 'eval': -1 is the latest in workdir

  c.lock()  # unknown keys are an error; table files may only change existing ones
  return c
