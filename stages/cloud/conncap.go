package cloud

import (
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"imcloud/pipeline"
)

// Client connections are capped node-wide (cloud.max_conns) so that
// clients can never take the descriptors the rest of the process needs:
// under a 200-descriptor limit, 182 connections authenticated with one
// token (a heartbeat every 4 minutes keeps each forever) left logic's
// push API without a descriptor to accept on, and new clients' auth timed
// out. The cap is counted at accept, over TCP and WebSocket alike and
// before a connection authenticates; one over it is accepted and closed
// at once, so accept never meets EMFILE while the reserve is kept.

// connReserve is the number of descriptors kept out of cloud.max_conns
// when it is derived from the descriptor limit: everything the process
// needs besides client connections (logic's HTTP and gRPC listeners and
// their connections, the broker, Redis, gRPC to the other nodes, log and
// config files, the parker's epoll set). max(min(256, limit/2),
// limit/10): 256 for a limit of 1,024 (768 clients), 10% of a large one
// (58,983 clients of 65,536), half of a very small one (100 of 200).
func connReserve(limit uint64) uint64 {
	return max(min(256, limit/2), limit/10)
}

// fallbackMaxConns is the cap where the descriptor limit cannot be read.
const fallbackMaxConns = 10_000

// maxConns is the node's connection cap: configured, or derived from the
// descriptor limit (see connReserve).
func maxConns(configured int, logger *slog.Logger) int {
	if configured > 0 {
		logger.Info("client connection cap", "max_conns", configured)
		return configured
	}
	limit, ok := nofileLimit()
	if !ok {
		logger.Info("client connection cap: descriptor limit unknown", "max_conns", fallbackMaxConns)
		return fallbackMaxConns
	}
	reserve := connReserve(limit)
	n := int(min(limit-reserve, 1<<31-1))
	logger.Info("client connection cap derived from the descriptor limit",
		"max_conns", n, "rlimit_nofile", limit, "reserve", reserve,
		"formula", "rlimit_nofile - max(min(256, rlimit_nofile/2), rlimit_nofile/10)")
	return n
}

// connLimiter counts a node's client connections and the handshakes in
// progress per client address.
type connLimiter struct {
	max    int64
	perIP  int
	logger *slog.Logger

	open atomic.Int64

	mu sync.Mutex
	// handshaking counts each address's connections not yet
	// authenticated. Entries go when they reach zero, so the map holds at
	// most one entry per connection open.
	handshaking map[netip.Prefix]int

	refused    atomic.Int64 // total
	refusedLog *pipeline.RateLog
}

func newConnLimiter(maxConns, perIP int, logger *slog.Logger) *connLimiter {
	return &connLimiter{max: int64(maxConns), perIP: perIP, logger: logger, handshaking: map[netip.Prefix]int{},
		refusedLog: pipeline.NewRateLog(logger, slog.LevelWarn, logEvery)}
}

// addrKey is the client address handshakes are counted by: the IPv4
// address, or the IPv6 /64 (one subscriber's usual allocation, which a
// client may otherwise spread its connections over).
func addrKey(a net.Addr) netip.Prefix {
	var ip netip.Addr
	if ta, ok := a.(*net.TCPAddr); ok {
		ip, _ = netip.AddrFromSlice(ta.IP)
	} else if ap, err := netip.ParseAddrPort(a.String()); err == nil {
		ip = ap.Addr()
	}
	ip = ip.Unmap()
	bits := ip.BitLen()
	if ip.Is6() {
		bits = 64
	}
	p, _ := ip.Prefix(bits)
	return p
}

// admit counts c in, or closes it when the node is at its cap or c's
// address at its handshakes; it reports whether c was admitted.
func (l *connLimiter) admit(c net.Conn) (*countedConn, bool) {
	if l.open.Add(1) > l.max {
		l.open.Add(-1)
		l.refuse(c, "cloud.max_conns")
		return nil, false
	}
	key := addrKey(c.RemoteAddr())
	l.mu.Lock()
	if l.handshaking[key] >= l.perIP {
		l.mu.Unlock()
		l.open.Add(-1)
		l.refuse(c, "cloud.max_handshakes_per_ip")
		return nil, false
	}
	l.handshaking[key]++
	l.mu.Unlock()
	cc := &countedConn{Conn: c, lim: l, key: key}
	cc.handshake.Store(true)
	return cc, true
}

func (l *connLimiter) endHandshake(key netip.Prefix) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if n := l.handshaking[key] - 1; n > 0 {
		l.handshaking[key] = n
	} else {
		delete(l.handshaking, key)
	}
}

// refuse closes c at once, and logs the refusals once per
// logEvery.
func (l *connLimiter) refuse(c net.Conn, limit string) {
	if tc, ok := c.(*net.TCPConn); ok {
		// A reset frees the socket at once; the client learns nothing
		// it could not from a close.
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
	n := l.refused.Add(1)
	l.refusedLog.Log("refusing client connections over a limit", "limit", limit,
		"refused_total", n, "max_conns", l.max, "open", l.open.Load(), "max_handshakes_per_ip", l.perIP)
}

// countedConn is an admitted connection: closing it counts it out.
type countedConn struct {
	net.Conn
	lim       *connLimiter
	key       netip.Prefix
	handshake atomic.Bool // counted among its address's handshakes
	closed    atomic.Bool
}

// authenticated ends the connection's handshake count.
func (c *countedConn) authenticated() {
	if c.handshake.CompareAndSwap(true, false) {
		c.lim.endHandshake(c.key)
	}
}

func (c *countedConn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		c.authenticated()
		c.lim.open.Add(-1)
	}
	return c.Conn.Close()
}

// markAuthenticated ends the handshake count of the connection under c
// (through TLS).
func markAuthenticated(c net.Conn) {
	for c != nil {
		switch v := c.(type) {
		case *countedConn:
			v.authenticated()
			return
		case interface{ NetConn() net.Conn }:
			c = v.NetConn()
		default:
			return
		}
	}
}

// capListener admits connections through a connLimiter; those it refuses
// are closed and never returned.
type capListener struct {
	net.Listener
	lim *connLimiter
}

func (l *capListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if cc, ok := l.lim.admit(c); ok {
			return cc, nil
		}
	}
}
