"""brainenc.report"""
