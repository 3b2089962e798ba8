package e2e

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"imcloud/proto/pb"
)

// faultProxy stands between job and a cloud node's gRPC server (the node
// advertises the proxy's address, so job dials it) and forwards every
// call as it is, except that it fails the first call carrying each
// message fail picks. It lives in the test harness, not in job or cloud:
// no switch a user could turn on fails deliveries on purpose.
//
// Half the failures (before) never reach the node: job's retry is the
// first delivery. The others reach the node and then fail: job's retry
// delivers a duplicate, which the node must drop.
type faultProxy struct {
	addr string
	// fail picks, by a proto's body, the messages whose first call fails,
	// and whether the call fails before the node gets it.
	fail func(body []byte) (failIt, before bool)

	backend atomic.Pointer[grpc.ClientConn]
	mu      sync.Mutex
	failed  map[string]bool // message ids already failed once
	// Injected counts the calls failed on purpose.
	injected atomic.Int64
}

// rawCodec passes messages through as bytes: the proxy decodes only the
// calls it may fail.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// startFaultProxy listens on loopback; calls fail with Unavailable (as a
// node not up yet would) until setBackend names the node's real address.
func startFaultProxy(t *testing.T, fail func(body []byte) (bool, bool)) *faultProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &faultProxy{addr: ln.Addr().String(), fail: fail, failed: map[string]bool{}}
	srv := grpc.NewServer(grpc.ForceServerCodec(rawCodec{}), grpc.UnknownServiceHandler(p.handle))
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Stop()
		if c := p.backend.Load(); c != nil {
			_ = c.Close()
		}
	})
	return p
}

func (p *faultProxy) setBackend(t *testing.T, addr string) {
	t.Helper()
	c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	p.backend.Store(c)
}

// handle forwards one unary call with its metadata (the cluster secret
// included).
func (p *faultProxy) handle(_ any, stream grpc.ServerStream) error {
	method, _ := grpc.MethodFromServerStream(stream)
	backend := p.backend.Load()
	if backend == nil {
		return status.Error(codes.Unavailable, "fault proxy: node not started yet")
	}
	var req []byte
	if err := stream.RecvMsg(&req); err != nil {
		return err
	}
	failing, before, err := p.decide(method, req)
	if err != nil {
		return status.Error(codes.Internal, err.Error())
	}
	failIt := failing > 0
	if failIt && before {
		p.injected.Add(int64(failing))
		return status.Error(codes.Unavailable, "fault proxy: injected failure before delivery")
	}
	ctx := stream.Context()
	out := metadata.MD{}
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		for k, v := range md {
			if strings.HasPrefix(k, ":") || strings.HasPrefix(k, "grpc-") || k == "content-type" || k == "user-agent" {
				continue
			}
			out[k] = v
		}
	}
	var reply []byte
	if err := backend.Invoke(metadata.NewOutgoingContext(ctx, out), method, &req, &reply, grpc.ForceCodec(rawCodec{})); err != nil {
		if failIt {
			// decide marked these as failed once: the node's own error
			// failed them all the same, and they will not be failed again.
			p.injected.Add(int64(failing))
		}
		return err
	}
	if failIt {
		p.injected.Add(int64(failing))
		return status.Error(codes.Unavailable, "fault proxy: injected failure after delivery")
	}
	return stream.SendMsg(&reply)
}

// decide reports how many of the call's messages fail it: those fail
// picks whose id was not failed before (a room batch may carry several;
// each counts as one injected failure).
func (p *faultProxy) decide(method string, req []byte) (failing int, before bool, err error) {
	var protos []*pb.Proto
	switch method {
	case pb.Cloud_PushMsg_FullMethodName:
		var r pb.PushMsgReq
		if err := proto.Unmarshal(req, &r); err != nil {
			return 0, false, fmt.Errorf("decode %s: %w", method, err)
		}
		protos = []*pb.Proto{r.Proto}
	case pb.Cloud_BroadcastRoom_FullMethodName:
		var r pb.BroadcastRoomReq
		if err := proto.Unmarshal(req, &r); err != nil {
			return 0, false, fmt.Errorf("decode %s: %w", method, err)
		}
		protos = append([]*pb.Proto{r.Proto}, r.Batch...)
	default:
		return 0, false, nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, pr := range protos {
		if pr == nil {
			continue
		}
		if pr.Id == "" {
			return 0, false, errors.New("a proto without a message id")
		}
		f, b := p.fail(pr.Body)
		if f && !p.failed[pr.Id] {
			p.failed[pr.Id] = true
			failing, before = failing+1, before || b
		}
	}
	return failing, before, nil
}
