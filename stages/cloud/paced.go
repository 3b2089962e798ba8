package cloud

import (
	"context"
	"math"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/proto/pb"
)

// startPaced starts a paced broadcast: item goes to every connection at
// speed connections a second, waiting between sends, never inside a
// bucket lock. What it may cost is bounded:
//
//   - at most cloud.max_paced_broadcasts run at once; one more is refused
//     with RESOURCE_EXHAUSTED before its message id is remembered, so
//     that job's retry (and at last the poison queue) keeps it;
//   - it ends within cloud.max_paced_duration: a speed too low for the
//     node's connections is raised, and logged;
//   - it holds no snapshot of every connection: it walks the buckets one
//     at a time, skipping connections that closed meanwhile, and ends
//     early when they are all gone;
//   - it stops when the node drains.
//
// Before these bounds, 100,000 clients at speed 1 held a goroutine and a
// snapshot of every connection for 28 hours, per broadcast, uncounted.
func (s *Stage) startPaced(p *pb.Proto, item outItem, speed int) (*pb.BroadcastReply, error) {
	select {
	case s.paced <- struct{}{}:
	default:
		return nil, status.Errorf(codes.ResourceExhausted, "%d paced broadcasts are running, the most this node runs at once (cloud.max_paced_broadcasts); try again later", cap(s.paced))
	}
	if !s.beginPaced() {
		<-s.paced
		return nil, status.Error(codes.Unavailable, "node is shutting down")
	}
	if !s.firstDelivery(p) {
		s.endPaced()
		return &pb.BroadcastReply{}, nil
	}
	conns := s.connCount()
	maxDur := s.cfg.MaxPacedDuration
	if need := int(math.Ceil(float64(conns) / maxDur.Seconds())); need > speed {
		s.logger.Info("paced broadcast speed raised to finish within cloud.max_paced_duration",
			"requested_speed", speed, "speed", need, "connections", conns, "max_paced_duration", maxDur)
		speed = need
	}
	ctx, cancel := context.WithTimeout(s.pacedCtx, maxDur)
	go func() {
		defer s.endPaced()
		defer cancel()
		s.pace(ctx, item, speed)
	}()
	return &pb.BroadcastReply{Delivered: int32(conns)}, nil
}

// beginPaced counts a paced broadcast in, unless the node is draining.
func (s *Stage) beginPaced() bool {
	s.connMu.RLock()
	defer s.connMu.RUnlock()
	if s.draining {
		return false
	}
	s.pacedWG.Add(1)
	return true
}

func (s *Stage) endPaced() {
	<-s.paced
	s.pacedWG.Done()
}

// connCount is how many connections the node holds.
func (s *Stage) connCount() int {
	n := 0
	for _, b := range s.buckets {
		n += b.size()
	}
	return n
}

// size is how many connections b holds.
func (b *bucket) size() int {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return len(b.chs)
}

// pacedRunning is how many paced broadcasts are running.
func (s *Stage) pacedRunning() int { return len(s.paced) }

// pace queues item to every open connection that accepts it, at speed a
// second, until done or ctx ends.
func (s *Stage) pace(ctx context.Context, item outItem, speed int) {
	start := time.Now()
	// A tenth of a second's worth goes at once, so that a high speed is
	// not one wake-up per connection.
	lim := rate.NewLimiter(rate.Limit(speed), max(1, speed/10))
	sent := 0
	var chs []*channel
	for i, b := range s.buckets {
		chs = b.channels(chs[:0])
		for j, ch := range chs {
			chs[j] = nil // what was sent to is not held for the rest of the bucket
			if ch.isClosed() || !ch.accepts(item.op) {
				continue
			}
			if err := lim.Wait(ctx); err != nil {
				left := len(chs) - j
				for _, b := range s.buckets[i+1:] {
					left += b.size()
				}
				s.logger.Warn("paced broadcast stopped", "reason", stopReason(ctx, s.pacedCtx), "sent", sent, "not_reached", left, "after", time.Since(start).Round(time.Millisecond))
				return
			}
			if ch.push(item) {
				sent++
			}
		}
	}
	clear(chs)
	s.logger.Debug("paced broadcast done", "sent", sent, "after", time.Since(start).Round(time.Millisecond))
}

// stopReason says why a paced broadcast's ctx ended.
func stopReason(ctx, node context.Context) string {
	switch {
	case node.Err() != nil:
		return "node draining"
	case ctx.Err() != nil:
		return "cloud.max_paced_duration reached"
	default:
		// Connections joined after the speed was chosen.
		return "cloud.max_paced_duration would be exceeded"
	}
}
