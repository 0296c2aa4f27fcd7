"""brainenc.metrics"""
