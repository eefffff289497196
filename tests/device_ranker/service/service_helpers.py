"""Helpers of the service tests: an asyncio loop in a background thread (so tests use the
plain synchronous gRPC stubs), tiny artefacts, and a self-signed TLS certificate."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import TypeVar

from device_ranker.gate import GateConfig
from device_ranker.service.config import CloudLinkConfig, DeviceConfig
from llm_cloud.service.server import CloudConfig

T = TypeVar("T")


def device_config(
    artifacts: tuple[Path, Path], cloud_port: int | None = None, **kw
) -> DeviceConfig:
    ds_dir, ckpt = artifacts
    base = dict(
        checkpoint=str(ckpt),
        dataset=str(ds_dir),
        max_candidates=50,
        gate=GateConfig(min_history=2, min_gap=1, threshold=0.0, budget=1.0),
        cloud=CloudLinkConfig(
            target=f"127.0.0.1:{cloud_port}" if cloud_port else None,
            deadline_s=2.0,
            probe_interval_s=0.2,
        ),
    )
    base.update(kw)
    return DeviceConfig(**base)


def cloud_config(artifacts: tuple[Path, Path], store: Path | None = None, **kw) -> CloudConfig:
    base = dict(
        engine="tiny",
        dataset=str(artifacts[0]),
        head_spec="fc0=16x8,fc1=8x16",
        store_url=f"sqlite:///{store}" if store else None,
    )
    base.update(kw)
    return CloudConfig(**base)


def write_tiny_artifacts(root: Path) -> tuple[Path, Path]:
    """A synthetic canonical dataset and a tiny ranker trained on it (a few seconds).

    Returns (dataset directory, checkpoint path)."""
    from ranker_helpers import make_dataset, tiny_train_config

    from device_ranker.train import train
    from recsys.data import write_dataset

    ds = make_dataset(num_users=24, num_items=30, length=12)
    ds_dir = write_dataset(ds, root / "dataset")
    ckpt = root / "ranker.pt"
    train(tiny_train_config(epochs=2), ds, checkpoint_path=ckpt, progress=False)
    return Path(ds_dir), ckpt


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem) for localhost / 127.0.0.1: with ``cryptography`` when it is
    installed, else the ``openssl`` command line tool."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            import pytest

            pytest.skip("neither the cryptography package nor the openssl tool is available")
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj",
             "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
        return cert, key
    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pkey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(pkey, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        pkey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key
