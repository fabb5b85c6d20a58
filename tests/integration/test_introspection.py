"""The introspection XML in dbus/ is what the daemon exports."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from .harness import ROOT, Client, guest_options


def canonical(element: ET.Element) -> Any:
    return (element.tag, sorted(element.attrib.items()), [canonical(c) for c in element])


def interface(xml: str, name: str) -> ET.Element:
    root = ET.fromstring(xml.split("\n", 2)[2] if xml.startswith("<!DOCTYPE") else xml)
    return next(e for e in root.iter("interface") if e.get("name") == name)


async def introspect(client: Client, path: str) -> str:
    (xml,) = await client.call("Introspect", path=path, interface="org.freedesktop.DBus.Introspectable")
    return str(xml)


async def test_shipped_xml_equals_what_the_daemon_exports(client: Client, guest: Any) -> None:
    path = await client.create("introspect", **guest_options(guest))
    for iface, object_path in (("org.vmspawnd1.Manager", "/org/vmspawnd1"), ("org.vmspawnd1.Machine", path)):
        shipped = (ROOT / "dbus" / f"{iface}.xml").read_text()
        live = await introspect(client, object_path)
        assert canonical(interface(live, iface)) == canonical(interface(shipped, iface)), iface


async def test_object_manager_lists_machines(client: Client, guest: Any) -> None:
    path = await client.create("managed", **guest_options(guest))
    (objects,) = await client.call(
        "GetManagedObjects", path="/org/vmspawnd1", interface="org.freedesktop.DBus.ObjectManager"
    )
    assert path in objects
    assert objects[path]["org.vmspawnd1.Machine"]["Name"].value == "managed"
