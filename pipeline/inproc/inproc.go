// Package inproc is a gRPC client connection to services in the same
// process: a call runs the service's handler directly, with no HTTP/2,
// no encoding and no loopback socket between them. A node that runs logic
// and cloud together (imcloud standalone, or run with both stages) has
// cloud call logic through it: over loopback gRPC the client and server
// halves of each Connect were 21 % of a node's CPU per WebSocket connect
// (pprof, 15,000 connects; issue 15), and 15,000 Connects at once queued
// on the one HTTP/2 connection (a reconnect storm took 13.5 s, 5.0 s now).
//
// What a call keeps of gRPC's semantics: the request and reply are copied
// (proto.Merge), so that neither side holds the other's messages, as
// after encoding; the handler gets the caller's context, with its
// deadline and cancellation; an error reaches the caller as a status (a
// context's own as Canceled or DeadlineExceeded, any other error as
// Unknown); a handler that panics ends the process, as it does in a
// grpc.Server without a recovery interceptor, rather than being caught
// by the caller. What differs: the call returns when the handler does,
// where a gRPC client returns at its deadline and leaves the server
// working (logic's stores bound their own waits); there is no network,
// whose limits and authentication guard calls from other processes; and
// no server interceptors, so these calls are not counted in the
// grpc_server_* and grpc_client_* metrics. Only unary methods are served.
package inproc

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Conn is a grpc.ClientConnInterface to the services registered on it
// (it is their grpc.ServiceRegistrar). Register every service before the
// first call; a Conn is then safe for concurrent use.
type Conn struct {
	methods map[string]method // by full name: "/imcloud.v1.Logic/Connect"
	closed  atomic.Bool
}

type method struct {
	srv     any
	handler grpc.MethodHandler
}

// New returns a Conn with no services.
func New() *Conn { return &Conn{methods: map[string]method{}} }

// RegisterService registers impl's unary methods, as a grpc.Server does.
// A service with streams, or one registered twice, is refused: it panics,
// as grpc.Server does on a registration it cannot serve.
func (c *Conn) RegisterService(desc *grpc.ServiceDesc, impl any) {
	if len(desc.Streams) > 0 {
		panic(fmt.Sprintf("inproc: service %s has streams, which are not served in process", desc.ServiceName))
	}
	for _, m := range desc.Methods {
		if _, dup := c.methods["/"+desc.ServiceName+"/"+m.MethodName]; dup {
			panic(fmt.Sprintf("inproc: service %s registered twice", desc.ServiceName))
		}
	}
	for _, m := range desc.Methods {
		c.methods["/"+desc.ServiceName+"/"+m.MethodName] = method{srv: impl, handler: m.Handler}
	}
}

// Close makes every later call fail with Unavailable, as a stopped
// server's do: a process that is shutting down stops its callers here
// where it stops its gRPC servers.
func (c *Conn) Close() { c.closed.Store(true) }

// Invoke calls the method's handler with a copy of args and copies what
// it returns into reply.
func (c *Conn) Invoke(ctx context.Context, name string, args, reply any, _ ...grpc.CallOption) error {
	if c.closed.Load() {
		return status.Error(codes.Unavailable, "inproc: the server has stopped")
	}
	m, ok := c.methods[name]
	if !ok {
		return status.Errorf(codes.Unimplemented, "inproc: unknown method %s", name)
	}
	in, ok := args.(proto.Message)
	if !ok {
		return status.Errorf(codes.Internal, "inproc: %s: request %T is not a protobuf message", name, args)
	}
	out, ok := reply.(proto.Message)
	if !ok {
		return status.Errorf(codes.Internal, "inproc: %s: reply %T is not a protobuf message", name, reply)
	}
	if err := ctx.Err(); err != nil {
		return status.FromContextError(err).Err()
	}
	decode := func(v any) error {
		req, ok := v.(proto.Message)
		if !ok {
			return status.Errorf(codes.Internal, "inproc: %s: request %T is not a protobuf message", name, v)
		}
		proto.Merge(req, in)
		return nil
	}
	defer func() {
		if v := recover(); v != nil {
			// Out of reach of the caller's recover: a handler that
			// panicked may hold a lock its next call waits on forever.
			stack := debug.Stack()
			go panic(fmt.Sprintf("inproc: %s panicked: %v\n%s", name, v, stack))
			select {} // the process ends
		}
	}()
	res, err := m.handler(m.srv, ctx, decode, nil)
	if err != nil {
		return asStatus(err)
	}
	got, ok := res.(proto.Message)
	if !ok {
		return status.Errorf(codes.Internal, "inproc: %s: reply %T is not a protobuf message", name, res)
	}
	proto.Reset(out)
	proto.Merge(out, got)
	return nil
}

// asStatus is err as a client would see it from a server: a status (or
// an error that wraps one) as that status alone, a context's error as its
// code, anything else as Unknown with its text.
func asStatus(err error) error {
	if s, ok := status.FromError(err); ok {
		return s.Err()
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return status.FromContextError(err).Err()
	}
	return status.Error(codes.Unknown, err.Error())
}

// NewStream refuses: only unary methods are served in process.
func (c *Conn) NewStream(context.Context, *grpc.StreamDesc, string, ...grpc.CallOption) (grpc.ClientStream, error) {
	return nil, status.Error(codes.Unimplemented, "inproc: streams are not served in process")
}
