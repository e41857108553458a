"""The browser dashboard: one page that reads the fleet straight from the broker over
MQTT WebSockets with a read-only account, and the small local server that serves it
(``edgefleet dashboard``).

The page (``static/``: plain JavaScript modules, MQTT.js and @msgpack/msgpack vendored)
decodes the wire format itself. The server serves it on loopback, hands it the home's
read-only dashboard account, serves the coordinator's audit trail when its data folder is
here, and relays the page's WebSocket to the broker's TLS listener (``relay.py`` says why).
"""

from dashboard.relay import BrokerTarget
from dashboard.server import DashboardConfig, DashboardServer

__all__ = ["BrokerTarget", "DashboardConfig", "DashboardServer"]
