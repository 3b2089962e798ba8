// Package cloudconn keeps one gRPC connection per cloud node, for the
// stages that call cloud nodes (job delivers, logic closes replaced
// sessions).
package cloudconn

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"

	"imcloud/proto/pb"
)

// connectWait bounds how long a call waits for a connection that is not up.
const connectWait = 2 * time.Second

// Pool holds the connections, by address. The zero value is not usable;
// call New.
type Pool struct {
	dial  []grpc.DialOption
	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
}

// New returns an empty pool whose connections dial with dial: the
// cluster's transport credentials and secret (see clusterauth). With none
// it dials in plaintext without a secret.
func New(dial ...grpc.DialOption) *Pool {
	if len(dial) == 0 {
		dial = []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	}
	return &Pool{dial: dial, conns: map[string]*grpc.ClientConn{}}
}

// Client returns a client of the node at addr, connecting on first use.
func (p *Pool) Client(addr string) (pb.CloudClient, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.conns[addr]; ok {
		return pb.NewCloudClient(c), nil
	}
	c, err := grpc.NewClient(addr, append(slices.Clone(p.dial),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: reconnectBackoff(), MinConnectTimeout: connectWait}),
		grpc.WithUnaryInterceptor(reconnectFirst))...)
	if err != nil {
		return nil, fmt.Errorf("dial cloud %s: %w", addr, err)
	}
	p.conns[addr] = c
	return pb.NewCloudClient(c), nil
}

// Close closes every connection.
func (p *Pool) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	var errs []error
	for addr, c := range p.conns {
		errs = append(errs, c.Close())
		delete(p.conns, addr)
	}
	return errors.Join(errs...)
}

// reconnectBackoff keeps gRPC retrying a lost node at least every second;
// its default grows to two minutes, leaving a node that came back
// unreachable long after. Callers pace their own retries anyway.
func reconnectBackoff() backoff.Config {
	return backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second}
}

// reconnectFirst makes a call to a node whose connection is not up wait up
// to connectWait for it, rather than fail at once while the connection is
// between attempts: a node that came back is reached by the next attempt
// or replay.
func reconnectFirst(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	if cc.GetState() != connectivity.Ready {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, connectWait)
		defer cancel()
		opts = append(opts, grpc.WaitForReady(true))
	}
	return invoker(ctx, method, req, reply, cc, opts...)
}
