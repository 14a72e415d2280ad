/* What the fan's tc programs share with the loader (fan_driver/dataplane/bpf/
 * __init__.py packs struct fan_config and struct fan_endpoint byte for byte). */
#ifndef FAN_H
#define FAN_H

#include <linux/types.h>

/* How the network's packets travel between hosts: the Python side's
 * Encapsulation.bpf_encap (fan_driver/dataplane/encap/). */
enum fan_encap {
	FAN_ENCAP_IPIP = 0,     /* outer IPv4 around bare IPv4 */
	FAN_ENCAP_VXLAN = 1,    /* outer IPv4, UDP and VXLAN around an Ethernet frame */
};

/* One network's values, set before load: the verifier then sees constants and
 * drops the branches a network does not take. Addresses in host byte order. */
struct fan_config {
	__u32 overlay_net, overlay_mask;
	__u32 underlay_net, underlay_mask;
	__u32 shift;            /* 32 - overlay prefix - host bits */
	__u32 slice_net, slice_mask;
	__u32 vni;
	__u32 local_ipv4;       /* this host's underlay address: the outer source */
	__u32 tunnel_ifindex;   /* the shared external-mode device */
	__u32 underlay_ifindex; /* where encapsulated packets leave */
	__u32 bridge_ifindex;   /* the network's bridge: where unknown addresses go */
	__u32 vxlan_port;       /* the UDP port of the network's VXLAN (-o vxlan_port) */
	__u8 tunnel_mac[6];     /* the MAC every host's VXLAN device has */
	__u8 encap;             /* enum fan_encap */
	__u8 send_encap;        /* the send program encapsulates itself */
	__u8 test_record_key;   /* tests only: keep the last tunnel key in .bss */
	__u8 pad[3];
};

/* The receive program's map: a container's address (host order) -> its veth. */
struct fan_endpoint {
	__u32 ifindex;          /* the host side of the container's veth */
	__u8 mac[6];            /* the container's MAC */
	__u8 pad[2];
};

#define FAN_AF_INET 2    /* <sys/socket.h> is not for BPF targets */
#define FAN_OUTER_TTL 64
/* outer IPv4 + UDP + VXLAN + inner Ethernet: what the send program inserts */
#define FAN_VXLAN_ROOM (20 + 8 + 8 + 14)
#define FAN_IPIP_ROOM 20 /* outer IPv4 */
#define IP_DF 0x4000     /* <net/ip.h> is the kernel's */

#endif
