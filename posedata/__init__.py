"""posedata: compute PGPIS features once, store them as WebDataset shards, train from them."""

__version__ = "0.1.0"
