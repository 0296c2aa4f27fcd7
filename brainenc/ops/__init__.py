"""brainenc.ops"""
