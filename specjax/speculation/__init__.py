"""Speculative decoding: draft proposers, token trees and lossless verification."""
