"""The CLI (`distload.cli.main.entry`) with half of each rank's layers on the disk tier
(`offload_common.install_tiers`), so that forwards wait for streamed weights."""

from offload_common import install_tiers

from distload.cli.main import entry

install_tiers()
entry()
