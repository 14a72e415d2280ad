"""How a network's tunnel finds the host of a remote overlay address: one
module per mechanism (base.PeerMapping), each asking the network's
encapsulation (encap.Encapsulation) what its devices and peers need."""
