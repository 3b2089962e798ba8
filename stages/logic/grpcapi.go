package logic

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/recovery"
	"golang.org/x/sync/semaphore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"
	"google.golang.org/protobuf/proto"

	"imcloud/proto/pb"
)

// pushAPI serves imcloud.api.v1.PushService (proto/api.proto): the HTTP
// API's pushes over gRPC, through the same validation and accept path.
type pushAPI struct {
	pb.UnimplementedPushServiceServer
	st *Stage
}

// StopStreams makes every PushStream answer what it has received and end
// (UNAVAILABLE: the sender retries the rest elsewhere), so that a graceful
// stop of the API's server does not wait for producers that never hang up.
func (st *Stage) StopStreams() { st.stopStreams.Do(func() { close(st.streamsStop) }) }

// RegisterAPI adds the public push service to s, a server made with
// APIServerOptions.
func (st *Stage) RegisterAPI(s *grpc.Server) { pb.RegisterPushServiceServer(s, &pushAPI{st: st}) }

// Limits of the API's gRPC server: backends hold a few long-lived
// connections, so streams per connection and idle time are generous, and
// the largest message is a PushBatch of logic.max_batch_bytes (plus the
// protobuf framing of its fields).
const (
	apiMaxStreams     = 256
	apiConnTimeout    = 10 * time.Second
	apiMaxIdle        = 5 * time.Minute
	apiPingMinTime    = 10 * time.Second
	apiFramingAllowed = 64 << 10
)

// APIServerOptions are the options of the gRPC server for RegisterAPI:
// the API key is checked when a call's headers arrive, before a byte of
// its message is read (grpc.InTapHandle), so a caller without one makes
// the server buffer nothing; and the limits above.
func (st *Stage) APIServerOptions() []grpc.ServerOption {
	// A panic in a handler is answered INTERNAL and logged, as net/http
	// does for the HTTP API, instead of ending the process.
	onPanic := recovery.WithRecoveryHandler(func(v any) error {
		st.logFailure(context.Background(), "panic in the gRPC push API", "panic", fmt.Sprint(v))
		return status.Error(codes.Internal, "internal error (logged)")
	})
	return []grpc.ServerOption{
		grpc.InTapHandle(st.apiTap),
		grpc.ChainUnaryInterceptor(recovery.UnaryServerInterceptor(onPanic)),
		grpc.ChainStreamInterceptor(recovery.StreamServerInterceptor(onPanic)),
		grpc.MaxRecvMsgSize(st.cfg.MaxBatchBytes + apiFramingAllowed),
		grpc.MaxConcurrentStreams(apiMaxStreams),
		grpc.ConnectionTimeout(apiConnTimeout),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: apiMaxIdle}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: apiPingMinTime, PermitWithoutStream: true}),
	}
}

// apiTap refuses a call without a valid API key ("authorization: Bearer
// <key>" in its metadata), as the HTTP API refuses a request.
func (st *Stage) apiTap(ctx context.Context, info *tap.Info) (context.Context, error) {
	auth := info.Header.Get("authorization")
	if len(auth) > 1 || !st.keyAccepted(strings.Join(auth, "")) {
		return ctx, status.Error(codes.Unauthenticated, "missing or wrong API key (metadata authorization: Bearer <key>)")
	}
	return ctx, nil
}

// grpcCode is the gRPC code of an HTTP status the accept path answers.
func grpcCode(httpStatus int) codes.Code {
	switch httpStatus {
	case http.StatusOK:
		return codes.OK
	case http.StatusBadRequest, http.StatusRequestEntityTooLarge:
		return codes.InvalidArgument
	case http.StatusConflict:
		return codes.Aborted
	case http.StatusUnprocessableEntity:
		return codes.FailedPrecondition
	case http.StatusServiceUnavailable:
		return codes.Unavailable
	default:
		return codes.Internal
	}
}

// apiRequest validates one push of the gRPC API through the HTTP API's
// route validators. The returned name is set once the route is known.
func (st *Stage) apiRequest(r *pb.PushRequest, corr string) (pushRequest, error) {
	if r == nil {
		return pushRequest{}, badParam("push", "required")
	}
	v := url.Values{"operation": {strconv.FormatInt(int64(r.Operation), 10)}}
	var name string
	switch t := r.Target.(type) {
	case *pb.PushRequest_Keys:
		name, v["keys"] = "push/keys", t.Keys.GetKeys()
	case *pb.PushRequest_Mids:
		name = "push/mids"
		for _, m := range t.Mids.GetMids() {
			v.Add("mids", strconv.FormatInt(m, 10))
		}
	case *pb.PushRequest_Room:
		name = "push/room"
		v.Set("type", t.Room.GetType())
		v.Set("room", t.Room.GetRoom())
	case *pb.PushRequest_All:
		name = "push/all"
		v.Set("speed", strconv.FormatInt(int64(t.All.GetSpeed()), 10))
	default:
		return pushRequest{}, badParam("target", "want one of keys, mids, room and all")
	}
	req := pushRequest{name: name}
	if n, max := proto.Size(r), int(jsonBodyLimit(st.cfg.MaxMessageBytes)); n > max {
		// As a single HTTP push's JSON body: a push of thousands of
		// targets is split over several.
		return req, &tooLargeError{fmt.Sprintf("push: %d bytes, at most %d (a message of logic.max_message_bytes with its targets)", n, max)}
	}
	if len(r.Msg) > st.cfg.MaxMessageBytes {
		return req, &tooLargeError{fmt.Sprintf("msg: larger than %d bytes", st.cfg.MaxMessageBytes)}
	}
	p := &params{values: v}
	op, err := p.operation()
	if err != nil {
		return req, err
	}
	t, err := st.pushes[name](apiIM, p)
	if err != nil {
		return req, err
	}
	if r.IdempotencyKey != "" {
		if err := checkText("idempotency_key", r.IdempotencyKey, MaxIdempotencyKeyBytes); err != nil {
			return req, err
		}
	}
	if r.RequestId != "" {
		if err := checkText("request_id", r.RequestId, maxRequestIDBytes); err != nil {
			return req, err
		}
		corr = r.RequestId
	}
	return newRequest(name, r.IdempotencyKey, corr, op, r.Msg, t), nil
}

// acceptAPI validates and accepts pushes of the gRPC API, answering each
// in order; corr names the call (its x-request-id, or a new one).
func (a *pushAPI) acceptAPI(ctx context.Context, pushes []*pb.PushRequest, corr string) []*pb.PushResult {
	out := a.st.acceptEach(ctx, len(pushes), func(i int) (pushRequest, error) {
		c := corr
		if len(pushes) > 1 {
			c = corr + "/" + strconv.Itoa(i)
		}
		return a.st.apiRequest(pushes[i], c)
	})
	results := make([]*pb.PushResult, len(out))
	for i, o := range out {
		results[i] = apiResult(o)
	}
	return results
}

// apiResult renders an outcome for the gRPC API.
func apiResult(o outcome) *pb.PushResult {
	if o.status != http.StatusOK {
		return &pb.PushResult{Code: int32(grpcCode(o.status)), Error: o.err}
	}
	r := o.result
	if r == nil {
		r = &PushResult{}
		if err := json.Unmarshal(o.data, r); err != nil {
			// The data is a PushResult logic marshalled, here or in the
			// idempotency store: it always decodes.
			return &pb.PushResult{Code: int32(codes.Internal), Error: "stored reply does not decode: " + err.Error()}
		}
	}
	reply := &pb.PushReply{MsgId: r.MsgID, Online: int32(r.Online), OfflineKeys: r.OfflineKeys, OfflineMids: r.OfflineMids, Replayed: o.replayed}
	for _, p := range r.Positions {
		reply.Positions = append(reply.Positions, &pb.Position{Stream: p.Stream, Epoch: p.Epoch, Pos: p.Pos})
	}
	return &pb.PushResult{Reply: reply}
}

// callID is the call's x-request-id (checked as the HTTP header is), or a
// new id.
func callID(ctx context.Context) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vs := md.Get("x-request-id")
	switch {
	case len(vs) > 1:
		return "", status.Error(codes.InvalidArgument, "x-request-id: given more than once")
	case len(vs) == 1:
		if err := checkText("x-request-id", vs[0], maxRequestIDBytes); err != nil {
			return "", status.Error(codes.InvalidArgument, err.Error())
		}
		return vs[0], nil
	}
	return uuid.NewString(), nil
}

// Push publishes one push.
func (a *pushAPI) Push(ctx context.Context, r *pb.PushRequest) (*pb.PushReply, error) {
	corr, err := callID(ctx)
	if err != nil {
		return nil, err
	}
	res := a.acceptAPI(ctx, []*pb.PushRequest{r}, corr)[0]
	if res.Code != int32(codes.OK) {
		return nil, status.Error(codes.Code(res.Code), res.Error)
	}
	return res.Reply, nil
}

// PushBatch publishes many pushes, answering each.
func (a *pushAPI) PushBatch(ctx context.Context, r *pb.PushBatchRequest) (*pb.PushBatchReply, error) {
	corr, err := callID(ctx)
	if err != nil {
		return nil, err
	}
	switch n := len(r.Pushes); {
	case n == 0:
		return nil, status.Error(codes.InvalidArgument, "pushes: none")
	case n > a.st.cfg.MaxBatchItems:
		return nil, status.Errorf(codes.InvalidArgument, "pushes: %d, more than %d (logic.max_batch_items)", n, a.st.cfg.MaxBatchItems)
	}
	return &pb.PushBatchReply{Results: a.acceptAPI(ctx, r.Pushes, corr)}, nil
}

// Bounds of PushStream beyond its window of pushes: the bytes its
// received and unanswered pushes may hold, and how many streams one logic
// serves at once. A stream so holds at most apiStreamBytes plus the one
// message being read (at most the server's MaxRecvMsgSize); 256 streams,
// some hundreds of MiB at worst, and that only with valid keys.
const (
	apiStreamBytes    = 1 << 20
	apiMaxOpenStreams = 256
)

// streamItem is a push received on a stream, with the bytes it holds of
// the stream's budget; err answers it without running it.
type streamItem struct {
	m    *pb.StreamPush
	size int64
	err  error
}

// PushStream takes pushes as they come and answers each once the broker
// has it. Up to logic.api_stream_window pushes (and apiStreamBytes) are
// unanswered at once; then it stops reading until results go out, and
// HTTP/2's flow control holds the sender. What has arrived while the
// previous pushes were published goes together (up to
// logic.max_batch_items): one bundle, one broker round trip. Batches go
// one after another, so pushes of the stream to one room or user take
// their positions in the order sent, and results go out in that order. The
// API key is checked again before each batch: a key SIGHUP removed ends
// the streams it opened.
func (a *pushAPI) PushStream(stream pb.PushService_PushStreamServer) error {
	ctx := stream.Context()
	corr, err := callID(ctx)
	if err != nil {
		return err
	}
	if n := a.st.streams.Add(1); n > apiMaxOpenStreams {
		a.st.streams.Add(-1)
		return status.Errorf(codes.ResourceExhausted, "%d push streams open on this logic, at most %d: push on an open one", n-1, apiMaxOpenStreams)
	}
	defer a.st.streams.Add(-1)
	md, _ := metadata.FromIncomingContext(ctx)
	auth := strings.Join(md.Get("authorization"), "")
	maxPush := int(jsonBodyLimit(a.st.cfg.MaxMessageBytes))
	window := a.st.cfg.APIStreamWindow
	slots := make(chan struct{}, window)
	budget := semaphore.NewWeighted(apiStreamBytes)
	in := make(chan streamItem, window)
	readErr := make(chan error, 1)
	go func() {
		defer close(in)
		for {
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
				readErr <- ctx.Err()
				return
			}
			m, err := stream.Recv()
			if err != nil {
				if err == io.EOF {
					err = nil
				}
				readErr <- err
				return
			}
			it := streamItem{m: m, size: int64(proto.Size(m))}
			if it.size > int64(maxPush) {
				// Answered without running, and without holding its bytes.
				it.err = &tooLargeError{fmt.Sprintf("push: %d bytes, at most %d (a message of logic.max_message_bytes with its targets)", it.size, maxPush)}
				m.Push, it.size = nil, 0
			}
			if err := budget.Acquire(ctx, it.size); err != nil {
				readErr <- err
				return
			}
			in <- it
		}
	}()
	var n uint64
	for {
		var first streamItem
		select {
		case it, ok := <-in:
			if !ok {
				return <-readErr
			}
			first = it
		case <-a.st.streamsStop:
			// Shutting down: what was received is answered, then the
			// stream ends; the sender retries what it has no result for.
			for {
				select {
				case it, ok := <-in:
					if ok {
						if err := a.answer(ctx, stream, []streamItem{it}, corr+"/last"); err != nil {
							return err
						}
						continue
					}
				default:
				}
				return status.Error(codes.Unavailable, "logic is shutting down: retry the pushes without a result elsewhere")
			}
		}
		if !a.st.keyAccepted(auth) {
			return status.Error(codes.Unauthenticated, "the API key of this stream was revoked")
		}
		batch := []streamItem{first}
	gather:
		for len(batch) < a.st.cfg.MaxBatchItems {
			select {
			case it, ok := <-in:
				if !ok {
					break gather
				}
				batch = append(batch, it)
			default:
				break gather
			}
		}
		if err := a.answer(ctx, stream, batch, corr+"/"+strconv.FormatUint(n, 10)); err != nil {
			return err
		}
		n++
		for _, it := range batch {
			budget.Release(it.size)
			<-slots
		}
	}
}

// answer accepts a stream's batch and sends each push's result, in order.
func (a *pushAPI) answer(ctx context.Context, stream pb.PushService_PushStreamServer, batch []streamItem, corr string) error {
	out := a.st.acceptEach(ctx, len(batch), func(i int) (pushRequest, error) {
		if batch[i].err != nil {
			return pushRequest{}, batch[i].err
		}
		return a.st.apiRequest(batch[i].m.Push, corr+"/"+strconv.Itoa(i))
	})
	for i, o := range out {
		if err := stream.Send(&pb.StreamResult{Id: batch[i].m.Id, Result: apiResult(o)}); err != nil {
			return err
		}
	}
	return nil
}
