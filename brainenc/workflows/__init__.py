"""brainenc.workflows"""
