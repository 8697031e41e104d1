"""stedm.losses: ``diffusion`` (the denoising loss of both diffusion modules), ``finetune``
(GenSelfDiff-HIS fine-tuning: focal + structural similarity), ``segmentation`` (the segmenter's)."""
