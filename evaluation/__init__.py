"""Metrics of finished assets: CLIP score (the paper's Table 1 text alignment), FID, ImageReward."""
