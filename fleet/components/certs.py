"""ChannelCerts: the stack's CA and the gateways' client certificate as pulumi-tls resources.

- the stack CA (ECDSA P-256, self-signed, ``channel.ca_validity_days``);
- one client certificate for the gateways.

Every private key here is a pulumi-tls ``PrivateKey``: a secret in the stack's state, never in the
plan, the routing config, an image or a marketplace. The workers' server certificates are not made
here: a marketplace stores a lease's env (or SDL) where its hosts can read it, so a worker makes its
own key in its container and the lease provider signs its certificate request with the CA key
(``ca_key``, handed to each mTLS GpuLease as a secret input) for the lease's endpoint name
(``fleet.channel.worker_server_name``: the name the gateway verifies and sends as SNI, since a
marketplace's forwarded address is known only after the lease exists); see
fleet/marketplaces/worker_tls.py.

Rotation: the gateway certificate has the declared ``channel.cert_validity_days`` and
``early_renewal_hours`` of ``channel.renew_before_days``; once inside that window the provider marks
it for renewal and the next `pulumi up` re-issues it. A worker's certificate is issued for the same
validity, and its lease is replaced (surge-paced) in the first `pulumi up` of each renewal period
(fleet/components/lease.py, ``tls_epoch``). The gateways trust the CA, so a worker's new
certificate needs no gateway change.

The CA itself renews with an overlap: at ``early_renewal_hours`` only its SelfSignedCert is
re-issued, over the same PrivateKey and subject, so every certificate issued under the old CA
certificate chains to the new one and back; a gateway holding the renewed CA and a worker still
holding the old one complete mutual TLS while the workers are replaced (tested with a real
handshake: tests/test_channel.py, test_a_renewed_ca_overlaps_the_old_one_in_both_directions). A new
CA *key* (``pulumi up --replace`` on the ``-ca`` PrivateKey, after a compromise) has no overlap by
design: every lease and the gateway certificate follow it in the same `up`.
"""

from __future__ import annotations

from typing import TypedDict

import pulumi
import pulumi_tls as tls


class ChannelCertsArgs(TypedDict):
    stack: str
    ca_validity_days: int
    cert_validity_days: int
    renew_before_days: int


class LeafTls(TypedDict):
    cert: pulumi.Output[str]
    key: pulumi.Output[str]


class ChannelCerts(pulumi.ComponentResource):
    ca_cert: pulumi.Output[str]
    ca_key: pulumi.Output[str]
    client_cert: pulumi.Output[str]
    client_key: pulumi.Output[str]

    def __init__(self, name: str, args: ChannelCertsArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("infermesh:fleet:ChannelCerts", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        hours, renew = args["cert_validity_days"] * 24, args["renew_before_days"] * 24
        ca_key = tls.PrivateKey(f"{name}-ca", algorithm="ECDSA", ecdsa_curve="P256", opts=child)
        ca = tls.SelfSignedCert(
            f"{name}-ca", private_key_pem=ca_key.private_key_pem, is_ca_certificate=True,
            subject=tls.SelfSignedCertSubjectArgs(common_name=f"infermesh {args['stack']} channel CA",
                                                  organization="infermesh"),
            validity_period_hours=args["ca_validity_days"] * 24, early_renewal_hours=renew,
            allowed_uses=["cert_signing", "crl_signing", "digital_signature"], set_subject_key_id=True, opts=child)

        def leaf(leaf_name: str, common_name: str, uses: list[str], dns: list[str]) -> LeafTls:
            key = tls.PrivateKey(leaf_name, algorithm="ECDSA", ecdsa_curve="P256", opts=child)
            csr = tls.CertRequest(leaf_name, private_key_pem=key.private_key_pem, dns_names=dns,
                                  subject=tls.CertRequestSubjectArgs(common_name=common_name,
                                                                     organization="infermesh"), opts=child)
            cert = tls.LocallySignedCert(
                leaf_name, cert_request_pem=csr.cert_request_pem, ca_private_key_pem=ca_key.private_key_pem,
                ca_cert_pem=ca.cert_pem, validity_period_hours=hours, early_renewal_hours=renew,
                allowed_uses=["digital_signature", "key_encipherment", *uses], opts=child)
            return LeafTls(cert=cert.cert_pem, key=pulumi.Output.secret(key.private_key_pem))

        self.ca_cert = ca.cert_pem
        self.ca_key = pulumi.Output.secret(ca_key.private_key_pem)
        gw = leaf(f"{name}-gateway", f"infermesh {args['stack']} gateway", ["client_auth"], [])
        self.client_cert, self.client_key = gw["cert"], gw["key"]
        self.register_outputs({"ca_cert": self.ca_cert, "client_cert": self.client_cert})
