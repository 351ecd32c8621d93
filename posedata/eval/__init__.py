"""Evaluation as the papers do it: SSIM, PSNR, LPIPS and FID under a named protocol (the
official metric script of PATN, GFLA, PIDM, PCDMs or CFLD), over `posedata sample` outputs.
See protocol.py for the interface, one module per protocol, and run.py for `posedata eval`."""

from posedata.eval.protocol import METRICS, REGISTRY, Protocol, create_protocol

__all__ = ["METRICS", "REGISTRY", "Protocol", "create_protocol"]
