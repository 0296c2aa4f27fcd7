"""brainenc.training"""
