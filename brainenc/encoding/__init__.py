"""brainenc.encoding"""
