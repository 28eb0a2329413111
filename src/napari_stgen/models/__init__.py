"""Models: GenST (two VQ-VAEs + alignment), STMDiT (DiT + sampler), checkpoint format."""
