"""Input pipelines: tfds coco/2017 and the built-in synthetic set, augmentation, batching."""
