r"""torchvision's RetinaNet on the same work as bench_backward's R50-FPN rows, for the ratio beside ours.

  pip install torch torchvision     # into any environment: not a dependency of this project
  python -m experiments.bench_torchvision --threads 2

R50-FPN RetinaNet as configs/base.py trains it (frozen BatchNorm, stem and layer1 frozen,
P6 from C5), 80 classes, 2 images of 512 x 640 (torchvision's transform keeps that size),
20 random boxes each. Prints the network's forward (backbone + FPN + head, no gradient) and
the full train step (matching, focal + L1 loss, backward, SGD), medians of --repeats after
a warm-up, and the step as a multiple of the forward: the figure issue 10 compares with
experiments.bench_backward's 'full train step' column.
"""

import argparse
import statistics
import sys
import time


def _import_torchvision():
  try:
    import torch
    import torch.library
  except ImportError:
    sys.exit('error: bench_torchvision needs torch and torchvision (pip install torch torchvision); '
             'they are not dependencies of retina_jax')
  # A torchvision wheel built for CUDA beside a CPU-only torch fails while registering the fake
  # (shape-only) kernels of its compiled operators (NMS, RoIAlign). Eager training uses neither,
  # so that registration is skipped.
  register_fake = torch.library.register_fake
  torch.library.register_fake = lambda *args, **kwargs: (lambda fn: fn)
  try:
    import torchvision
  finally:
    torch.library.register_fake = register_fake
  return torch, torchvision


def _median_s(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  torch, torchvision = _import_torchvision()
  from torchvision.models import resnet50
  from torchvision.models.detection import backbone_utils
  from torchvision.models.detection.retinanet import RetinaNet
  from torchvision.ops import misc
  from torchvision.ops.feature_pyramid_network import LastLevelP6P7

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  body = resnet50(norm_layer=misc.FrozenBatchNorm2d)
  backbone = backbone_utils._resnet_fpn_extractor(  # 3 trainable stages: stem and layer1 frozen
      body, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(2048, 256))
  model = RetinaNet(backbone, num_classes=80, min_size=512, max_size=640)
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
  g = torch.Generator().manual_seed(0)
  images = [torch.rand(3, 512, 640, generator=g) for _ in range(2)]
  size = torch.tensor([640.0, 512.0])
  targets = []
  for _ in images:
    xy = torch.rand(20, 2, generator=g) * size * 0.8
    wh = (torch.rand(20, 2, generator=g) * 0.35 + 0.05) * size
    targets.append({'boxes': torch.cat([xy, torch.minimum(xy + wh, size)], 1),
                    'labels': torch.randint(0, 80, (20,), generator=g)})
  batch = torch.stack(images)

  def forward():
    with torch.no_grad():
      model.head(list(model.backbone(batch).values()))

  def step():
    optimizer.zero_grad()
    losses = model(images, targets)
    sum(losses.values()).backward()
    optimizer.step()

  model.eval()
  forward_s = _median_s(forward, args.repeats)
  model.train()
  step_s = _median_s(step, args.repeats)
  print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads')
  print(f'R50-FPN, 2 x 512 x 640, 80 classes, float32 (seconds per call, median of {args.repeats})')
  print('| forward | full train step |\n|---|---|')
  print(f'| {forward_s:.3f} | {step_s:.3f} ({step_s / forward_s:.2f}x) |')


if __name__ == '__main__':
  main()
