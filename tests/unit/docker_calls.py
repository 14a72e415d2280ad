"""The drivers called with the bodies Docker sends and answering what Docker
reads back: each call goes through the server's decode and encode (its Route
and answer), without HTTP. Same arguments, in the same order, as Docker's
fields."""
from __future__ import annotations

from fan_driver import protocol as p
from fan_driver.server import Route, answer


async def request_pool(ipam, pool="", sub_pool="", options=None, v6=False) -> dict:
    return await answer(Route(ipam.request_pool, p.PoolRequest.decode),
                        {"Pool": pool, "SubPool": sub_pool, "Options": options, "V6": v6})


async def release_pool(ipam, pool_id) -> dict:
    return await answer(Route(ipam.release_pool, p.PoolRef.decode), {"PoolID": pool_id})


async def request_address(ipam, pool_id, address="", options=None) -> dict:
    return await answer(Route(ipam.request_address, p.AddressRequest.decode),
                        {"PoolID": pool_id, "Address": address, "Options": options})


async def release_address(ipam, pool_id, address) -> dict:
    return await answer(Route(ipam.release_address, p.AddressRelease.decode),
                        {"PoolID": pool_id, "Address": address})


async def create_network(network, network_id, options=None, ipv4_data=None,
                         ipv6_data=None) -> dict:
    return await answer(Route(network.create_network, p.CreateNetwork.decode),
                        {"NetworkID": network_id, "Options": options, "IPv4Data": ipv4_data,
                         "IPv6Data": ipv6_data})


async def delete_network(network, network_id) -> dict:
    return await answer(Route(network.delete_network, p.NetworkRef.decode),
                        {"NetworkID": network_id})


async def create_endpoint(network, network_id, endpoint_id, interface=None) -> dict:
    return await answer(Route(network.create_endpoint, p.CreateEndpoint.decode),
                        {"NetworkID": network_id, "EndpointID": endpoint_id,
                         "Interface": interface})


async def delete_endpoint(network, network_id, endpoint_id) -> dict:
    return await answer(Route(network.delete_endpoint, p.EndpointRef.decode),
                        {"NetworkID": network_id, "EndpointID": endpoint_id})
