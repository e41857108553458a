"""Everything about the broker: rendering its config, ACLs and TLS material, running it,
and talking to it: :mod:`broker.session` (the link the parties use, a
:class:`broker.transport.Transport`) over :mod:`broker.link` (its sans-IO bookkeeping) and
:mod:`broker.driver` (the only module that imports the MQTT client).
"""

from broker.acl import Accounts, DeviceGrant, render_acl, render_password_file
from broker.config import BrokerPorts, ConfigError, default_template, render_config
from broker.launcher import (
    BrokerError,
    BrokerMaterial,
    MosquittoBroker,
    free_port,
    free_ports,
    reload_running,
    running_pid,
    update_files,
    which_mosquitto,
)
from broker.pki import (
    cert_serial,
    issue_client_cert,
    issue_server_cert,
    make_ca,
    make_crl,
    write_private,
    write_public,
)

__all__ = [
    "Accounts",
    "BrokerError",
    "BrokerMaterial",
    "BrokerPorts",
    "ConfigError",
    "DeviceGrant",
    "MosquittoBroker",
    "cert_serial",
    "default_template",
    "free_port",
    "free_ports",
    "issue_client_cert",
    "issue_server_cert",
    "make_ca",
    "make_crl",
    "reload_running",
    "render_acl",
    "render_config",
    "render_password_file",
    "running_pid",
    "update_files",
    "which_mosquitto",
    "write_private",
    "write_public",
]
