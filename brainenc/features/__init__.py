"""brainenc.features"""
