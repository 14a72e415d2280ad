// SPDX-License-Identifier: GPL-2.0
/* The Fan's tc programs for stock kernels.
 *
 * fan_tunnel_key: on the shared external-mode (collect_md) tunnel device's
 *   egress, sets each packet's tunnel key by the Fan rule: the outer
 *   destination computed from the inner one, constant per-host state instead
 *   of one route/neighbour/FDB entry per peer.
 * fan_send: on each container veth's ingress, unicast IPv4 for another host's
 *   slice skips the host's IP forwarding (and netfilter): encapsulated here and
 *   handed straight to the underlay device (or, without the underlay's index,
 *   to the tunnel device, whose fan_tunnel_key sets the outer address). Only
 *   with the container's own address as its source: the rest is dropped.
 * fan_decap: on the underlay device's ingress, VXLAN for this host, the
 *   network's UDP port and VNI from a peer (the trust rule below) whose inner destination
 *   is a container in the endpoints map loses its outer headers and goes
 *   straight into the container's namespace: no UDP socket lookup, vxlan_rcv or
 *   metadata dst, and none of the host's PREROUTING and INPUT. Built with
 *   FAN_CONNTRACK (fan_conntrack.bpf.o), only a flow the host's firewall has
 *   already let in (a confirmed conntrack entry) is taken. The rest goes on
 *   untouched to the VXLAN device, through netfilter, where fan_receive judges it.
 * fan_receive: on the tunnel device's ingress, after the kernel decapsulated:
 *   what is for the network's overlay passes only by the trust rule (VNI and
 *   outer source from the tunnel key) and only for this host's slice; on
 *   VXLAN, IPv4 for a container then goes straight into its namespace (or,
 *   unknown, to the bridge); IPIP's bare packets are left to the kernel.
 *
 * The trust rule: a packet from the tunnel is a peer's only when its outer
 * source is another host of the underlay and its inner source lies in the
 * slice that host owns (fan_outer(inner source) == outer source).
 *
 * Shortcuts decrement the TTL as the router they replace would and leave
 * everything else (ARP, broadcasts, local traffic, expiring TTLs) to the
 * kernel. What is not the network's gets TC_ACT_UNSPEC on a shared device, so
 * that the next network's filter can take it.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <stddef.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "fan.h"

const volatile struct fan_config cfg = {};

/* Tests only (cfg.test_record_key): the verifier removes the write otherwise. */
struct bpf_tunnel_key recorded_key = {};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* memory per entry in use */
	__uint(max_entries, 256);             /* the loader sets the slice's size */
	__type(key, __u32);
	__type(value, struct fan_endpoint);
} endpoints SEC(".maps");

char LICENSE[] SEC("license") = "GPL"; /* bpf_skb_set_tunnel_key is GPL-only */

/* Accepted by every kernel since 4.x: the fields after it are zero. */
#define TUNNEL_KEY_SIZE offsetof(struct bpf_tunnel_key, tunnel_label)

static __always_inline int in_net(__u32 addr, __u32 net, __u32 mask)
{
	return (addr & mask) == net;
}

/* The fan rule: the overlay bits below the overlay prefix (O bits long), shifted
 * right by 32 - O - H (H: the underlay's host bits), give the peer's host part. */
static __always_inline __u32 fan_outer(__u32 inner)
{
	return cfg.underlay_net | ((inner & ~cfg.overlay_mask) >> cfg.shift);
}

/* The trust rule (host order): `outer` is another host of the underlay, and
 * `src`, the inner source, lies in the slice that host owns. */
static __always_inline int from_peer(__u32 outer, __u32 src)
{
	return in_net(outer, cfg.underlay_net, cfg.underlay_mask) && outer != cfg.local_ipv4 &&
	       in_net(src, cfg.overlay_net, cfg.overlay_mask) && fan_outer(src) == outer;
}

/* The IPv4 header at `off` (a constant), pulled into the linear area if need
 * be, or NULL. */
static __always_inline struct iphdr *ipv4_at(struct __sk_buff *skb, __u32 off)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return NULL;
	if ((void *)(long)skb->data + off + sizeof(struct iphdr) > (void *)(long)skb->data_end &&
	    bpf_skb_pull_data(skb, off + sizeof(struct iphdr)))
		return NULL;
	struct iphdr *ip = (void *)(long)skb->data + off;
	if ((void *)(ip + 1) > (void *)(long)skb->data_end || ip->version != 4)
		return NULL;
	return ip;
}

/* What a router does: TTL - 1, the checksum updated as ip_decrease_ttl does. */
static __always_inline void decrement_ttl(struct iphdr *ip)
{
	__u32 check = ip->check;

	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xFFFF));
	ip->ttl--;
}

/* Whether the tunnel's packets are Ethernet frames rather than bare IPv4 (the
 * Python side's Encapsulation.l2). A constant to the verifier, which drops the
 * branches a network does not take. */
static __always_inline int carries_ethernet(void)
{
	switch (cfg.encap) {
	case FAN_ENCAP_VXLAN:
		return 1;
	default:   /* FAN_ENCAP_IPIP */
		return 0;
	}
}

static __always_inline void copy_mac(__u8 *to, const volatile __u8 *from)
{
#pragma unroll
	for (int i = 0; i < ETH_ALEN; i++)
		to[i] = from[i];
}

SEC("tc")
int fan_tunnel_key(struct __sk_buff *skb)
{
	/* Helpers rather than packet pointers: the offset differs by tunnel, and a
	 * loader without CAP_PERFMON (the plugin) may not add a register to one. */
	__u32 off = carries_ethernet() ? ETH_HLEN : 0;
	__u8 version;
	__be32 daddr;

	if (skb->protocol != bpf_htons(ETH_P_IP) || bpf_skb_load_bytes(skb, off, &version, 1) ||
	    version >> 4 != 4 ||
	    bpf_skb_load_bytes(skb, off + offsetof(struct iphdr, daddr), &daddr, sizeof(daddr)))
		return TC_ACT_UNSPEC;
	__u32 dst = bpf_ntohl(daddr);
	if (!in_net(dst, cfg.overlay_net, cfg.overlay_mask))
		return TC_ACT_UNSPEC;
	if (carries_ethernet()) {
		/* The frame's source is the device's MAC, which is every host's:
		 * vxlan_rcv drops frames from its own MAC as loops. Flip a bit. */
		struct ethhdr *eth = (void *)(long)skb->data;

		if ((void *)(eth + 1) > (void *)(long)skb->data_end)
			return TC_ACT_UNSPEC;
		eth->h_source[ETH_ALEN - 1] ^= 1;
	}
	struct bpf_tunnel_key key;

	/* every byte set: a loader without CAP_PERFMON may not pass unset stack */
	__builtin_memset(&key, 0, sizeof(key));
	key.tunnel_id = cfg.vni;
	key.remote_ipv4 = fan_outer(dst); /* host order: the helper converts */
	key.tunnel_ttl = FAN_OUTER_TTL;
	if (cfg.test_record_key)
		recorded_key = key;
	/* No outer UDP checksum, as RFC 7348 advises and Linux's VXLAN defaults to. */
	if (bpf_skb_set_tunnel_key(skb, &key, TUNNEL_KEY_SIZE, BPF_F_ZERO_CSUM_TX))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

static __always_inline __u16 ipv4_checksum(struct iphdr *ip)
{
	__u16 *words = (__u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)sizeof(*ip) / 2; i++)
		sum += words[i];
	sum = (sum & 0xFFFF) + (sum >> 16);
	sum = (sum & 0xFFFF) + (sum >> 16);
	return ~sum;
}

struct vxlanhdr {
	__be32 flags; /* 0x08000000: the VNI is valid */
	__be32 vni;   /* VNI << 8 */
};

/* The outer IPv4 header of a packet of `len` bytes (from this header on) to
 * `remote`, as the kernel's tunnel devices write it. */
static __always_inline void outer_ipv4(struct iphdr *ip, __u32 len, __u8 protocol,
				       __be16 frag_off, __u32 remote)
{
	*ip = (struct iphdr){
		.version = 4, .ihl = 5, .tot_len = bpf_htons(len), .frag_off = frag_off,
		.ttl = FAN_OUTER_TTL, .protocol = protocol,
		.saddr = bpf_htonl(cfg.local_ipv4), .daddr = bpf_htonl(remote),
	};
	ip->check = ipv4_checksum(ip);
}

/* The encapsulated packet out of the underlay device to the next hop the FIB
 * lookup found, or, its MAC not known yet, to the kernel's neighbour code. */
static __always_inline int to_underlay(struct ethhdr *eth, struct bpf_fib_lookup *fib,
				       int have_neigh)
{
	eth->h_proto = bpf_htons(ETH_P_IP);
	if (!have_neigh) {
		/* the kernel resolves the next hop's MAC and writes the header */
		struct bpf_redir_neigh nh;

		__builtin_memset(&nh, 0, sizeof(nh));
		nh.nh_family = FAN_AF_INET;
		nh.ipv4_nh = fib->ipv4_dst;

		return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
	}
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	return bpf_redirect(fib->ifindex, 0);
}

/* The frame, routed, to `remote` over VXLAN as the kernel's VXLAN device would
 * build it, then straight out of the underlay device. Called after a FIB lookup
 * found the way; a kernel that cannot grow the packet so (before 5.13) leaves it
 * as it was, for the kernel's path. */
static __always_inline int vxlan_encap(struct __sk_buff *skb, __u32 remote,
				       struct bpf_fib_lookup *fib, int have_neigh)
{
	/* the flow's hash picks the source port, as udp_flow_src_port does */
	__u16 sport = (((__u64)bpf_get_hash_recalc(skb) * (61000 - 32768)) >> 32) + 32768;
	struct ethhdr inner;

	void *data = (void *)(long)skb->data;
	if (data + sizeof(inner) > (void *)(long)skb->data_end)
		return TC_ACT_SHOT;
	__builtin_memcpy(&inner, data, sizeof(inner));
	copy_mac(inner.h_dest, cfg.tunnel_mac);
	/* FIXED_GSO: the container's MTU already leaves room for the headers */
	if (bpf_skb_adjust_room(skb, FAN_VXLAN_ROOM, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
				BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
				BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN)))
		return TC_ACT_OK;
	data = (void *)(long)skb->data;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	struct udphdr *udp = (void *)(ip + 1);
	struct vxlanhdr *vx = (void *)(udp + 1);
	struct ethhdr *in = (void *)(vx + 1);
	struct iphdr *inner_ip = (void *)(in + 1);
	if ((void *)(inner_ip + 1) > (void *)(long)skb->data_end)
		return TC_ACT_SHOT;
	*in = inner;
	decrement_ttl(inner_ip);
	vx->flags = bpf_htonl(0x08000000);
	vx->vni = bpf_htonl(cfg.vni << 8);
	/* lengths of a GSO packet are set again for each segment */
	__u32 outer_len = skb->len - ETH_HLEN;
	udp->source = bpf_htons(sport);
	udp->dest = bpf_htons(cfg.vxlan_port);
	udp->len = bpf_htons(outer_len - sizeof(*ip));
	udp->check = 0;
	/* DF, as Docker's overlay sends */
	outer_ipv4(ip, outer_len, IPPROTO_UDP, bpf_htons(IP_DF), remote);
	return to_underlay(eth, fib, have_neigh);
}

/* The packet, routed, to `remote` over IPIP as the kernel's IPIP device would
 * build it (RFC 2003: the inner DF bit copied out), then straight out of the
 * underlay device. */
static __always_inline int ipip_encap(struct __sk_buff *skb, __u32 remote,
				      struct bpf_fib_lookup *fib, int have_neigh)
{
	if (bpf_skb_adjust_room(skb, FAN_IPIP_ROOM, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4))
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	struct iphdr *inner_ip = ip + 1;
	if ((void *)(inner_ip + 1) > (void *)(long)skb->data_end)
		return TC_ACT_SHOT;
	decrement_ttl(inner_ip);
	outer_ipv4(ip, skb->len - ETH_HLEN, IPPROTO_IPIP, inner_ip->frag_off & bpf_htons(IP_DF),
		   remote);
	return to_underlay(eth, fib, have_neigh);
}

/* The way to `remote` on the underlay, looked up as the kernel's output path
 * would: 1 with the next hop's MAC, 0 without it, -1 for none (kernel path). */
static __always_inline int underlay_route(struct __sk_buff *skb, __u32 remote,
					  struct bpf_fib_lookup *fib)
{
	fib->family = FAN_AF_INET;
	fib->ipv4_src = bpf_htonl(cfg.local_ipv4);
	fib->ipv4_dst = bpf_htonl(remote);
	fib->ifindex = cfg.underlay_ifindex;
	long found = bpf_fib_lookup(skb, fib, sizeof(*fib), BPF_FIB_LOOKUP_OUTPUT);
	if (found == BPF_FIB_LKUP_RET_SUCCESS)
		return 1;
	return found == BPF_FIB_LKUP_RET_NO_NEIGH ? 0 : -1;
}

SEC("tc")
int fan_send(struct __sk_buff *skb)
{
	struct iphdr *ip = ipv4_at(skb, ETH_HLEN);

	if (!ip)
		return TC_ACT_OK;
	__u32 dst = bpf_ntohl(ip->daddr);
	if (!in_net(dst, cfg.overlay_net, cfg.overlay_mask) ||
	    in_net(dst, cfg.slice_net, cfg.slice_mask) || ip->ttl <= 1)
		return TC_ACT_OK;
	struct ethhdr *eth = (void *)(long)skb->data;
	/* unicast only (the container's router is the gateway): broadcasts and
	 * multicasts stay on the bridge */
	if ((void *)(eth + 1) > (void *)(long)skb->data_end || eth->h_dest[0] & 1)
		return TC_ACT_OK;
	/* Only the container's own address, from its own veth, goes to a peer:
	 * a container cannot put another's address (or a forged one) into the
	 * tunnel, where the peer's trust rule would accept it. */
	__u32 src = bpf_ntohl(ip->saddr);
	struct fan_endpoint *self = bpf_map_lookup_elem(&endpoints, &src);

	if (!self || self->ifindex != skb->ifindex)
		return TC_ACT_SHOT;
	if (cfg.send_encap) {
		__u32 remote = fan_outer(dst);
		struct bpf_fib_lookup fib;

		__builtin_memset(&fib, 0, sizeof(fib));
		int neigh = underlay_route(skb, remote, &fib);

		if (neigh < 0)
			return TC_ACT_OK;
		switch (cfg.encap) {
		case FAN_ENCAP_VXLAN:
			return vxlan_encap(skb, remote, &fib, neigh);
		case FAN_ENCAP_IPIP:
			return ipip_encap(skb, remote, &fib, neigh);
		default:   /* one this program cannot build: the kernel's path */
			return TC_ACT_OK;
		}
	}
	decrement_ttl(ip);
	if (carries_ethernet())
		copy_mac(eth->h_dest, cfg.tunnel_mac);
	/* an L3 tunnel drops the Ethernet header itself */
	return bpf_redirect(cfg.tunnel_ifindex, 0);
}

/* Whether the packet the kernel decapsulated, of inner source `src`, is a
 * peer's: the network's VNI (VXLAN) and the trust rule on the tunnel key's
 * outer source. A packet without tunnel metadata (none on an external-mode
 * device's ingress; a test run's) is not. */
static __always_inline int tunnel_peer(struct __sk_buff *skb, __u32 src)
{
	struct bpf_tunnel_key key;

	if (bpf_skb_get_tunnel_key(skb, &key, TUNNEL_KEY_SIZE, 0))
		return 0;
	if (cfg.encap == FAN_ENCAP_VXLAN && key.tunnel_id != cfg.vni)
		return 0;
	return from_peer(key.remote_ipv4, src); /* the helper gives host order */
}

SEC("tc")
int fan_receive(struct __sk_buff *skb)
{
	/* VXLAN's packets are Ethernet frames, IPIP's bare IPv4 (constant offsets:
	 * the verifier keeps one branch) */
	struct iphdr *ip = carries_ethernet() ? ipv4_at(skb, ETH_HLEN) : ipv4_at(skb, 0);

	if (!ip)
		return TC_ACT_UNSPEC;
	__u32 dst = bpf_ntohl(ip->daddr);
	/* The shared device carries every network's packets: what is not for this
	 * network's overlay is the next filter's (or the kernel's). What is, this
	 * filter judges: nothing after it would. */
	if (!in_net(dst, cfg.overlay_net, cfg.overlay_mask))
		return TC_ACT_UNSPEC;
	if (!tunnel_peer(skb, bpf_ntohl(ip->saddr)))
		return TC_ACT_SHOT;
	/* another host's slice: the kernel would route it back into the tunnel,
	 * a relay for whoever sent it */
	if (!in_net(dst, cfg.slice_net, cfg.slice_mask))
		return TC_ACT_SHOT;
	/* the gateway (this host), the slice's broadcast, an expiring TTL: the
	 * kernel's path */
	if (dst == cfg.slice_net + 1 || dst == (cfg.slice_net | ~cfg.slice_mask) || ip->ttl <= 1)
		return TC_ACT_UNSPEC;
	/* IPIP's packets have no Ethernet header to readdress: the kernel routes
	 * them to the bridge */
	if (!carries_ethernet())
		return TC_ACT_UNSPEC;
	decrement_ttl(ip);
	struct fan_endpoint *ep = bpf_map_lookup_elem(&endpoints, &dst);
	if (!ep)   /* not in the map (yet): out of the bridge, by the neighbour table */
		return bpf_redirect_neigh(cfg.bridge_ifindex, NULL, 0, 0);
	struct ethhdr *eth = (void *)(long)skb->data;
	if ((void *)(eth + 1) > (void *)(long)skb->data_end)
		return TC_ACT_SHOT;
	__builtin_memcpy(eth->h_dest, ep->mac, ETH_ALEN);
	return bpf_redirect_peer(ep->ifindex, 0);
}

struct vxlan_frame {   /* what fan_decap expects at the start of the packet */
	struct ethhdr eth;
	struct iphdr ip;
	struct udphdr udp;
	struct vxlanhdr vx;
	struct ethhdr inner_eth;
	struct iphdr inner_ip;
} __attribute__((packed));

#define IP_FRAGMENT bpf_htons(0x3FFF)   /* MF or an offset: IP_MF | IP_OFFSET */
#define PACKET_HOST 0                   /* <linux/if_packet.h>: addressed to us */

#ifdef FAN_CONNTRACK
/* The conntrack kfuncs (kernel 6.0+, in nf_conntrack). Their own object, not a
 * __weak extern behind a switch: libbpf resolves every extern of an object, and
 * one in a module's BTF (Debian's nf_conntrack is a module) takes iterating
 * BTF ids, which needs CAP_SYS_ADMIN: the plugin, without it, could not load
 * the object at all. */
struct nf_conn {};
struct bpf_ct_opts {     /* the kernel's (not UAPI): the 12 bytes every version accepts */
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;
	__u8 reserved[2];
};
extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
					 __u32 tuple_size, struct bpf_ct_opts *opts,
					 __u32 opts_size) __ksym;
extern void bpf_ct_release(struct nf_conn *ct) __ksym;

/* Whether the host's firewall let the frame's outer flow in already: only a
 * confirmed conntrack entry is in the table, and an entry is confirmed once its
 * flow's first packet passed the host's INPUT chain. */
static __always_inline int flow_admitted(struct __sk_buff *skb, struct vxlan_frame *f)
{
	struct bpf_sock_tuple tuple;
	struct bpf_ct_opts opts;

	/* every byte set: a loader without CAP_PERFMON may not pass unset stack */
	__builtin_memset(&tuple, 0, sizeof(tuple));
	__builtin_memset(&opts, 0, sizeof(opts));
	tuple.ipv4.saddr = f->ip.saddr;
	tuple.ipv4.daddr = f->ip.daddr;
	tuple.ipv4.sport = f->udp.source;
	tuple.ipv4.dport = f->udp.dest;
	opts.netns_id = BPF_F_CURRENT_NETNS;
	opts.l4proto = IPPROTO_UDP;
	struct nf_conn *ct = bpf_skb_ct_lookup(skb, &tuple, sizeof(tuple.ipv4), &opts, sizeof(opts));

	if (!ct)
		return 0;
	bpf_ct_release(ct);
	return 1;
}
#endif

/* The frame if it is VXLAN to this host's address and the network's VNI, of
 * unfragmented IPv4 that a router would forward (TTL > 1), or NULL. */
static __always_inline struct vxlan_frame *fan_vxlan(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP) || skb->pkt_type != PACKET_HOST)
		return NULL;
	if ((void *)(long)skb->data + sizeof(struct vxlan_frame) > (void *)(long)skb->data_end &&
	    bpf_skb_pull_data(skb, sizeof(struct vxlan_frame)))
		return NULL;
	struct vxlan_frame *f = (void *)(long)skb->data;
	if ((void *)(f + 1) > (void *)(long)skb->data_end)
		return NULL;
	/* outer: no options (the offsets are constant), not a fragment */
	if (f->ip.version != 4 || f->ip.ihl != 5 || f->ip.protocol != IPPROTO_UDP ||
	    f->ip.frag_off & IP_FRAGMENT || f->ip.daddr != bpf_htonl(cfg.local_ipv4) ||
	    f->udp.dest != bpf_htons(cfg.vxlan_port))
		return NULL;
	if (f->vx.flags != bpf_htonl(0x08000000) || f->vx.vni != bpf_htonl(cfg.vni << 8))
		return NULL;
	if (f->inner_eth.h_proto != bpf_htons(ETH_P_IP) || f->inner_ip.version != 4 ||
	    f->inner_ip.ttl <= 1)
		return NULL;
	return f;
}

SEC("tc")
int fan_decap(struct __sk_buff *skb)
{
	struct vxlan_frame *f = fan_vxlan(skb);

	if (!f)
		return TC_ACT_UNSPEC;
	/* Not a peer's: left untouched rather than dropped, so that it takes the
	 * kernel's path, where the host's firewall sees (and may log or count) it
	 * and fan_receive drops it; this filter, on a device the fan does not
	 * own, takes only what it delivers. */
	if (!from_peer(bpf_ntohl(f->ip.saddr), bpf_ntohl(f->inner_ip.saddr)))
		return TC_ACT_UNSPEC;
	__u32 dst = bpf_ntohl(f->inner_ip.daddr);
	/* a container of the map; the rest (the gateway, broadcasts, addresses
	 * not in the map yet) the VXLAN device and fan_receive deliver */
	struct fan_endpoint *ep = bpf_map_lookup_elem(&endpoints, &dst);
	if (!ep)
		return TC_ACT_UNSPEC;
#ifdef FAN_CONNTRACK
	/* a flow the firewall has not let in yet takes the kernel's path, INPUT */
	if (!flow_admitted(skb, f))
		return TC_ACT_UNSPEC;
#endif
	__u8 source[ETH_ALEN];

	__builtin_memcpy(source, f->inner_eth.h_source, ETH_ALEN);
	/* Outer IPv4, UDP, VXLAN and the inner Ethernet header out: what stays is
	 * the outer Ethernet header, then the inner IPv4 packet. FIXED_GSO keeps a
	 * GSO packet's segment size, the inner MSS. Nothing is changed before
	 * this: if it fails, the packet goes on as it came. */
	if (bpf_skb_adjust_room(skb, -(__s32)FAN_VXLAN_ROOM, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO))
		return TC_ACT_UNSPEC;
	struct ethhdr *eth = (void *)(long)skb->data;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > (void *)(long)skb->data_end)
		return TC_ACT_SHOT;
	/* the frame as fan_receive would hand it over (h_proto is IPv4 already) */
	__builtin_memcpy(eth->h_dest, ep->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, source, ETH_ALEN);
	decrement_ttl(ip);
	return bpf_redirect_peer(ep->ifindex, 0);
}
