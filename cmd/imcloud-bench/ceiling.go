package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"google.golang.org/grpc"

	"imcloud/proto/pb"
)

// ceiling serves a push API that does no work, until ctx ends: HTTP on
// api, where any POST is read whole and answered 200 with a success (a
// batch's with "failed":0), and PushService on grpcAddr, whose PushStream
// answers each push at once. Loaded by the push mode exactly as imcloud
// is (scripts/bench.sh), it measures what this machine allows any server
// built on the same libraries: the load generator's own cost and each
// request's syscalls, with nothing of a server's work. On the machine of
// BENCHMARKS.md that was 40–42k single requests/s under wrk, against a
// target of 80k; a push rate is read against it.
func ceiling(ctx context.Context, api, grpcAddr string, progress io.Writer) (ceilingResult, error) {
	for _, a := range []string{api, grpcAddr} {
		if err := loopbackOnly(a); err != nil {
			return ceilingResult{}, err
		}
	}
	hl, err := net.Listen("tcp", api)
	if err != nil {
		return ceilingResult{}, fmt.Errorf("listen %s: %w", api, err)
	}
	gl, err := net.Listen("tcp", grpcAddr)
	if err != nil {
		hl.Close()
		return ceilingResult{}, fmt.Errorf("listen %s: %w", grpcAddr, err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(answerAtOnce), ReadHeaderTimeout: 10 * time.Second}
	gs := grpc.NewServer()
	pb.RegisterPushServiceServer(gs, nullPushService{})
	errs := make(chan error, 2)
	go func() { errs <- hs.Serve(hl) }()
	go func() { errs <- gs.Serve(gl) }()
	fmt.Fprintf(progress, "ceiling: a push API doing no work on http://%s and grpc %s\n", api, grpcAddr)
	select {
	case <-ctx.Done():
	case err = <-errs:
	}
	gs.Stop()
	_ = hs.Close()
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		return ceilingResult{}, fmt.Errorf("ceiling server: %w", err)
	}
	return ceilingResult{API: api, GRPC: grpcAddr}, nil
}

// answerAtOnce reads a request's body and answers it as a successful
// push, or batch, would be.
func answerAtOnce(w http.ResponseWriter, r *http.Request) {
	_, _ = io.Copy(io.Discard, io.LimitReader(r.Body, 8<<20))
	w.Header().Set("Content-Type", "application/json")
	_, _ = io.WriteString(w, `{"code":0,"message":"ok","data":{"accepted":1,"failed":0,"results":[]}}`+"\n")
}

// nullPushService answers each pushed message at once, with a result of
// the shape imcloud's carries.
type nullPushService struct {
	pb.UnimplementedPushServiceServer
}

func (nullPushService) PushStream(s pb.PushService_PushStreamServer) error {
	for {
		m, err := s.Recv()
		if err != nil {
			return nil // the producer closed its side, or left
		}
		res := &pb.StreamResult{Id: m.Id, Result: &pb.PushResult{Reply: &pb.PushReply{MsgId: "00000000-0000-0000-0000-000000000000"}}}
		if err := s.Send(res); err != nil {
			return err
		}
	}
}

// ceilingResult says where the ceiling server listened.
type ceilingResult struct {
	API  string `json:"api"`
	GRPC string `json:"grpc"`
}

func (r ceilingResult) Print(w io.Writer) {
	fmt.Fprintf(w, "ceiling server on http://%s and grpc %s stopped\n", r.API, r.GRPC)
}
