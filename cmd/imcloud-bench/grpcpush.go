package main

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"imcloud/proto/pb"
)

// grpcPush drives the gRPC push API's PushStream: Concurrency streams,
// each sending room pushes (over 16 rooms) as fast as the server's flow
// control lets it, for Duration. Latency is from a push's send to its
// result.
func grpcPush(ctx context.Context, c pushConfig, addr string, progress io.Writer) (pushResult, error) {
	if err := loopbackOnly(addr); err != nil {
		return pushResult{}, err
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return pushResult{}, fmt.Errorf("dial %s: %w", addr, err)
	}
	defer conn.Close()
	api := pb.NewPushServiceClient(conn)
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.APIKey)
	var ok, failed atomic.Int64
	var lat latencies
	stop := make(chan struct{})
	go ticker(progress, stop, func(e time.Duration) string {
		return fmt.Sprintf("grpc push %s: %d ok, %d failed", e, ok.Load(), failed.Load())
	})
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, c.Concurrency)
	for range c.Concurrency {
		wg.Go(func() {
			sctx, cancel := context.WithCancel(ctx)
			defer cancel()
			s, err := api.PushStream(sctx)
			if err != nil {
				errs <- err
				return
			}
			// Send times by id; the stream answers in order within a
			// batch, so a ring of the window's size would do, but a map
			// keeps the bench honest if it does not.
			var mu sync.Mutex
			sent := map[uint64]time.Time{}
			deadline := time.Now().Add(c.Duration)
			go func() {
				for i := uint64(0); time.Now().Before(deadline); i++ {
					push := &pb.PushRequest{Operation: 1000, Msg: []byte("bench"),
						Target: &pb.PushRequest_Room{Room: &pb.Room{Type: "live", Room: "bench" + strconv.Itoa(int(i%16))}}}
					mu.Lock()
					sent[i] = time.Now()
					mu.Unlock()
					if err := s.Send(&pb.StreamPush{Id: i, Push: push}); err != nil {
						return
					}
				}
				_ = s.CloseSend()
			}()
			var mine []time.Duration
			for {
				r, err := s.Recv()
				if err != nil {
					if err != io.EOF {
						errs <- err
					}
					break
				}
				mu.Lock()
				t0 := sent[r.Id]
				delete(sent, r.Id)
				mu.Unlock()
				if r.Result.GetCode() != 0 {
					failed.Add(1)
					continue
				}
				ok.Add(1)
				mine = append(mine, time.Since(t0))
			}
			lat.AddAll(mine)
		})
	}
	wg.Wait()
	close(stop)
	secs := time.Since(start).Seconds()
	close(errs)
	if err := <-errs; err != nil {
		return pushResult{}, fmt.Errorf("stream: %w", err)
	}
	return pushResult{
		Requests: ok.Load(), Failed: failed.Load(), PerSecond: float64(ok.Load()) / secs,
		Batch: 1, PushesPerSecond: float64(ok.Load()) / secs,
		LatencyMs: lat.percentiles(), Concurrency: c.Concurrency, Seconds: secs,
	}, nil
}
