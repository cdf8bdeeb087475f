"""dakd: diffusion-based data augmentation and knowledge distillation for SAR
oil-spill segmentation, on Ray."""

__version__ = "0.1.0"
