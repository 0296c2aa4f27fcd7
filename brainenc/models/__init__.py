"""brainenc.models"""
