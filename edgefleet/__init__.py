"""edgefleet: roll ML models out safely to fleets of edge devices over MQTT.

This package composes the parts (``schemas``, ``broker``, ``agent``,
``coordinator``, ``models``) into the ``edgefleet`` command and its demo.
"""

from edgefleet.home import Home

__all__ = ["Home"]
