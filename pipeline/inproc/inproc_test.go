package inproc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/proto/pb"
)

// logic is a Logic server whose Connect does what each case needs.
type logic struct {
	pb.UnimplementedLogicServer
	connect func(context.Context, *pb.ConnectReq) (*pb.ConnectReply, error)
}

func (l *logic) Connect(ctx context.Context, req *pb.ConnectReq) (*pb.ConnectReply, error) {
	return l.connect(ctx, req)
}

func client(l *logic) pb.LogicClient {
	c := New()
	pb.RegisterLogicServer(c, l)
	return pb.NewLogicClient(c)
}

// TestCallCopiesMessages: the handler gets its own request and the caller
// its own reply, as after encoding: what either side changes later the
// other does not see.
func TestCallCopiesMessages(t *testing.T) {
	kept := &pb.ConnectReply{Key: "k", Rooms: []string{"live://1"}}
	var got *pb.ConnectReq
	c := client(&logic{connect: func(ctx context.Context, req *pb.ConnectReq) (*pb.ConnectReply, error) {
		got = req
		return kept, nil
	}})
	req := &pb.ConnectReq{Server: "node-1", Token: []byte("t")}
	reply, err := c.Connect(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if reply.Key != "k" || len(reply.Rooms) != 1 || reply.Rooms[0] != "live://1" {
		t.Fatalf("reply %v", reply)
	}
	if got == req || got.Server != "node-1" || string(got.Token) != "t" {
		t.Fatalf("handler got %p %v, caller sent %p", got, got, req)
	}
	reply.Rooms[0] = "changed"
	req.Token[0] = 'X' // a caller's buffer, reused
	if kept.Rooms[0] != "live://1" || string(got.Token) != "t" {
		t.Fatalf("a change on one side reached the other: server's reply %v, its request %v", kept, got)
	}
}

// TestCallErrors: errors reach the caller as a remote server's would.
func TestCallErrors(t *testing.T) {
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	short, cancelShort := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancelShort()
	waitForEnd := func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }
	for _, tc := range []struct {
		name     string
		ctx      context.Context
		err      func(ctx context.Context) error
		want     codes.Code
		wantText string
	}{
		{"a status as it is", context.Background(), func(context.Context) error { return status.Error(codes.Unauthenticated, "invalid token") }, codes.Unauthenticated, "invalid token"},
		{"a wrapped status as that status alone", context.Background(), func(context.Context) error {
			return fmt.Errorf("outer: %w", status.Error(codes.Unavailable, "registry unavailable"))
		}, codes.Unavailable, "outer: rpc error: code = Unavailable desc = registry unavailable"},
		{"a plain error as Unknown", context.Background(), func(context.Context) error { return errors.New("boom") }, codes.Unknown, "boom"},
		{"a deadline that passes during the call", short, waitForEnd, codes.DeadlineExceeded, ""},
		{"a call whose context ended is not made", cancelled, nil, codes.Canceled, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			called := false
			c := client(&logic{connect: func(ctx context.Context, _ *pb.ConnectReq) (*pb.ConnectReply, error) {
				called = true
				return nil, tc.err(ctx)
			}})
			_, err := c.Connect(tc.ctx, &pb.ConnectReq{})
			if status.Code(err) != tc.want {
				t.Fatalf("error %v (%v), want %v", err, status.Code(err), tc.want)
			}
			if s, _ := status.FromError(err); tc.wantText != "" && s.Message() != tc.wantText {
				t.Fatalf("message %q, want %q", s.Message(), tc.wantText)
			}
			if errors.Unwrap(err) != nil {
				t.Fatalf("the caller can unwrap the server's error: %#v", err)
			}
			if tc.err == nil && called {
				t.Fatal("the handler ran for a call whose context had ended")
			}
		})
	}
}

// TestClose: after Close every call fails with Unavailable, as a stopped
// server's calls do, and no handler runs.
func TestClose(t *testing.T) {
	c := New()
	called := false
	pb.RegisterLogicServer(c, &logic{connect: func(context.Context, *pb.ConnectReq) (*pb.ConnectReply, error) {
		called = true
		return &pb.ConnectReply{}, nil
	}})
	c.Close()
	if _, err := pb.NewLogicClient(c).Connect(context.Background(), &pb.ConnectReq{}); status.Code(err) != codes.Unavailable || called {
		t.Fatalf("after Close: %v, handler ran: %v", err, called)
	}
}

// TestUnservedCalls: a method nobody registered, or a stream, is
// Unimplemented; registering a service with streams, or one twice,
// panics, as a grpc.Server does with what it cannot serve.
func TestUnservedCalls(t *testing.T) {
	c := New()
	pb.RegisterLogicServer(c, &logic{connect: func(context.Context, *pb.ConnectReq) (*pb.ConnectReply, error) {
		return &pb.ConnectReply{Key: "k"}, nil
	}})
	var reply pb.ConnectReply
	if err := c.Invoke(context.Background(), pb.Logic_Connect_FullMethodName, &pb.ConnectReq{}, &reply); err != nil || reply.Key != "k" {
		t.Fatalf("%s: %v, %v", pb.Logic_Connect_FullMethodName, &reply, err)
	}
	if err := c.Invoke(context.Background(), "/imcloud.v1.Logic/Nope", &pb.ConnectReq{}, &reply); status.Code(err) != codes.Unimplemented {
		t.Fatalf("unregistered method: %v", err)
	}
	if _, err := c.NewStream(context.Background(), &grpc.StreamDesc{}, "/x/y"); status.Code(err) != codes.Unimplemented {
		t.Fatalf("stream: %v", err)
	}
	// The Logic service's own Unimplemented methods answer as they would remotely.
	if _, err := pb.NewLogicClient(c).Tops(context.Background(), &pb.TopsReq{}); status.Code(err) != codes.Unimplemented {
		t.Fatalf("unimplemented method: %v", err)
	}
	for name, register := range map[string]func(){
		"a service with streams": func() { pb.RegisterPushServiceServer(c, pb.UnimplementedPushServiceServer{}) },
		"a service twice":        func() { pb.RegisterLogicServer(c, &logic{}) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s was registered", name)
				}
			}()
			register()
		}()
	}
}

// TestHandlerPanicEndsTheProcess: a handler's panic is not the caller's
// to recover, as it is not over gRPC: the process ends, saying where.
func TestHandlerPanicEndsTheProcess(t *testing.T) {
	if os.Getenv("INPROC_PANIC") == "1" {
		c := client(&logic{connect: func(context.Context, *pb.ConnectReq) (*pb.ConnectReply, error) { panic("handler bug") }})
		defer func() {
			if v := recover(); v != nil {
				fmt.Println("the caller recovered", v)
				os.Exit(0)
			}
		}()
		_, _ = c.Connect(context.Background(), &pb.ConnectReq{})
		os.Exit(0) // not reached: the call never returns
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHandlerPanicEndsTheProcess$")
	cmd.Env = append(os.Environ(), "INPROC_PANIC=1")
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("the process went on after a handler panicked:\n%s", out)
	}
	if !strings.Contains(string(out), "inproc: "+pb.Logic_Connect_FullMethodName+" panicked: handler bug") {
		t.Fatalf("the crash does not say which call panicked:\n%s", out)
	}
}
