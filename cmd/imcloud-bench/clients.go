package main

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"imcloud/proto/client"
	"imcloud/stages/logic/token"
)

// clientConfig says how bench clients connect.
type clientConfig struct {
	// Target is ws://host:port/sub or host:port (TCP).
	Target string
	// Secret signs the clients' tokens (logic.auth.jwt_secret).
	Secret string
}

// sourceIPs is how many 127.0.0.x addresses the clients connect from.
// One source address has about 28k ephemeral ports toward one server
// port, and the ports of the previous run's connections linger in
// TIME_WAIT, slowing every bind that has to search past them; spread
// over 64 addresses, a million connections fit and binds stay quick.
const sourceIPs = 64

// dialer binds connection i to one of the sourceIPs loopback addresses.
func dialer(i int) *net.Dialer {
	return &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+i%sourceIPs))}, Timeout: 30 * time.Second}
}

// targetHost is the host:port a client target names.
func targetHost(target string) string {
	if u, err := url.Parse(target); err == nil && (u.Scheme == "ws" || u.Scheme == "wss") {
		return u.Host
	}
	return target
}

// connectAll opens n authenticated clients, 128 at a time; claims gives
// client i's token claims. It reports progress through connected.
func connectAll(ctx context.Context, c clientConfig, n int, claims func(i int) token.Claims, connected *atomic.Int64) ([]*client.Conn, error) {
	if err := loopbackOnly(targetHost(c.Target)); err != nil {
		return nil, err
	}
	conns := make([]*client.Conn, n)
	errs := make(chan error, 1)
	sem := make(chan struct{}, 128)
	var wg sync.WaitGroup
	for i := range n {
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			tok, err := token.Sign(c.Secret, claims(i), time.Hour)
			if err != nil {
				select {
				case errs <- err:
				default:
				}
				return
			}
			conn, err := client.Dial(ctx, c.Target, client.Options{Dialer: dialer(i)})
			if err == nil {
				_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
				if _, err = conn.Auth([]byte(tok)); err != nil {
					_ = conn.Close()
				}
			}
			if err != nil {
				select {
				case errs <- fmt.Errorf("client %d: %w", i, err):
				default:
				}
				return
			}
			_ = conn.SetReadDeadline(time.Time{})
			conns[i] = conn
			connected.Add(1)
		})
	}
	wg.Wait()
	select {
	case err := <-errs:
		closeAll(conns)
		return nil, err
	default:
	}
	return conns, ctx.Err()
}

func closeAll(conns []*client.Conn) {
	for _, c := range conns {
		if c != nil {
			_ = c.Close()
		}
	}
}
