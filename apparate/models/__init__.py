"""Ramp sites and ramps: cut vertices of the exported graph, adapters (HF BERT family), training."""

from apparate.models.ee_decoder import EEDecoder
from apparate.models.ee_model import EEModel, load, prepare
from apparate.models.segments import SegmentedBackbone, Site

__all__ = ["EEDecoder", "EEModel", "SegmentedBackbone", "Site", "load", "prepare"]
