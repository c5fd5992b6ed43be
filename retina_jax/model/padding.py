"""Keeps canvas padding out of the network: each image's outputs do not depend on its canvas.

Images are padded with zeros to a canvas (one square, or a size bucket). Zeros at the
input are not enough: after a convolution's bias or a norm's shift the padded cells hold
values, and every convolution pads the canvas edge with zeros, so a cell near an image's
right or bottom edge would depend on how much canvas lies beyond it, and a GroupNorm's
statistics on all of it. The network therefore zeroes the cells outside the image before
every convolution and leaves them out of GroupNorm's statistics. Then an image gives the
same outputs on any canvas that holds it (buckets and the square canvas agree; detectron2's
and torchvision's outputs depend on the other images of the batch), equal to a forward of
the image alone with each convolution's own zero padding. One exception: trainable
BatchNorm's batch statistics, while training, still take in the padding (resnet.Block.norm
says why); frozen BatchNorm (the paper's) and every evaluation are canvas independent.

Where the image fills its canvas the mask is all ones and changes no bit of the convolutions
and BatchNorm (the forward on such inputs still equals torchvision's); heads.GroupNorm's
statistics are then summed in another order (the last bits move).

A cell of a feature map with stride s covers the image when its index is below
ceil(image extent / s): exactly the cells a forward on the image alone would have.
"""

import jax.numpy as jnp


class ImageMask:
  """The image's cells on each feature map of one padded batch.

  Args:
    image_hw: [B, 2] float32 (height, width) of each image on the canvas, in pixels; None
      when the images fill the canvas (nothing is masked).
    canvas_hw: (H, W) of the canvas, static.
  """

  def __init__(self, image_hw=None, canvas_hw=None):
    self.image_hw = image_hw
    self.canvas_hw = canvas_hw

  def cells(self, x):
    """[B, h, w, C] feature map -> [B, h, w, C] bool, True on the image's cells; None if unmasked."""
    if self.image_hw is None:
      return None
    (canvas_h, canvas_w), (h, w) = self.canvas_hw, x.shape[1:3]
    if canvas_h % h or canvas_w % w:
      raise ValueError(f'ImageMask: feature map {h}x{w} is not a stride of the canvas {canvas_h}x{canvas_w}')
    extent = jnp.ceil(self.image_hw / jnp.array([canvas_h // h, canvas_w // w], jnp.float32))  # [B, 2]
    rows = jnp.arange(h)[None, :] < extent[:, :1]  # [B, h]
    cols = jnp.arange(w)[None, :] < extent[:, 1:]  # [B, w]
    return jnp.broadcast_to((rows[:, :, None] & cols[:, None, :])[..., None], x.shape)

  def __call__(self, x):
    """x with the cells outside the image set to zero (x itself when unmasked)."""
    cells = self.cells(x)
    return x if cells is None else jnp.where(cells, x, jnp.zeros((), x.dtype))


UNPADDED = ImageMask()
