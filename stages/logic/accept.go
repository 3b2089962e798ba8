package logic

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"imcloud/pipeline"
	"imcloud/pipeline/idempotency"
)

// pushRequest is one validated push, whichever API it came by: a single
// HTTP push, an item of a batch, or a gRPC call.
type pushRequest struct {
	name    string // the route: push/keys, push/mids, push/room, push/all
	idemKey string // "": none
	fp      string // the fingerprint; only with an idempotency key
	push    Push
	t       target
}

// newRequest derives a push's id from its idempotency key and content.
func newRequest(name, idemKey, corr string, op int32, msg []byte, t target) pushRequest {
	fp := "" // a push without an Idempotency-Key needs none
	if idemKey != "" {
		fp = fingerprint(name, op, t, msg)
	}
	return pushRequest{name: name, idemKey: idemKey, fp: fp, t: t,
		push: Push{ID: MessageID(idemKey, name, fp), CorrelationID: corr, Operation: op, Msg: msg}}
}

// storeKey is the request's key in the idempotency store: the key is the
// caller's per route, whichever API the request came by, so a batch item
// retried as a single push is answered from the item's reply.
func (r *pushRequest) storeKey() string { return r.name + "\x00" + r.idemKey }

// outcome is how one push is answered, as an HTTP status (the gRPC API
// maps it to a code).
type outcome struct {
	status int
	// err is the message of a failure; data the PushResult's JSON of a
	// success (stored as is for a retry), made by body when first needed.
	err      string
	data     []byte
	replayed bool // answered from the idempotency store
	// result is what data encodes, for a push accepted now (nil for one
	// replayed): the gRPC API answers from it instead of decoding data
	// again, which was 9 % of a node's CPU on one PushStream (pprof).
	result *PushResult
}

func failed(status int, msg string) outcome { return outcome{status: status, err: msg} }

// body is a success's PushResult as JSON: data as stored (a replay), or
// result encoded when first asked for. The gRPC API answers from result
// and needs no JSON unless the reply is stored for an idempotency key.
func (o *outcome) body() []byte {
	if o.data == nil && o.result != nil {
		o.data, _ = json.Marshal(o.result) // a PushResult always encodes
	}
	return o.data
}

// retryable reports whether a retry of the same push may succeed: the
// HTTP API says so with Retry-After.
func (o outcome) retryable() bool {
	return o.status == http.StatusServiceUnavailable || o.status == http.StatusConflict
}

// acceptParallel bounds how many of a batch's pushes wait on the
// registry, the idempotency store or the history at once: on Redis each is
// a round trip, and overlapping them is what makes a batch cheaper than
// as many single pushes; 32 in flight keeps a loopback Redis busy without
// one batch taking the whole client pool (go-redis' default, 10 per CPU).
const acceptParallel = 32

// accept publishes reqs and answers each, in order: through the
// idempotency store (a retry is answered from it, a concurrent one
// refused), resolved, positioned, and published in one call to the
// broker. ctx bounds publishing; settle bounds completing or releasing
// the keys, which happens even if ctx has ended.
func (st *Stage) accept(ctx context.Context, reqs []pushRequest, settle time.Duration) []outcome {
	parallel := acceptParallel
	if st.inProcess {
		// Nothing to overlap: goroutines would only add their cost (a
		// batch of 100 spent 7 % of its CPU starting them).
		parallel = 1
	}
	out := make([]outcome, len(reqs))
	tokens := make([]string, len(reqs)) // "": no reservation to settle
	errs := make([]error, len(reqs))

	// A key given twice in one request is one push: the later ones are
	// answered as its retries would be, once it is (dupOf[i] is the first).
	dupOf := make([]int, len(reqs))
	first := map[string]int{}
	for i := range reqs {
		dupOf[i] = -1
		if reqs[i].idemKey == "" || st.replies == nil {
			continue
		}
		if j, dup := first[reqs[i].storeKey()]; dup {
			dupOf[i] = j
			errs[i] = errAnswered
			continue
		}
		first[reqs[i].storeKey()] = i
	}
	pending := func(i int) bool { return out[i].status == 0 && dupOf[i] < 0 }
	internal := func(what string) func(i int, v any) {
		return func(i int, v any) {
			st.logFailure(ctx, "panic while accepting a push: "+what, "route", reqs[i].name, "correlation_id", reqs[i].push.CorrelationID, "panic", fmt.Sprint(v))
			out[i] = failed(http.StatusInternalServerError, "internal error (logged with correlation id "+reqs[i].push.CorrelationID+")")
		}
	}

	if st.replies != nil {
		each(len(reqs), parallel, func(i int) {
			if reqs[i].idemKey == "" || !pending(i) {
				return
			}
			out[i], tokens[i] = st.reserve(ctx, &reqs[i])
		}, internal("reserve"))
	}

	// Settle every reservation, even if ctx ended (the caller may have
	// left, or the push budget run out) or a push panicked: a key held
	// would refuse retries until idempotency.InFlightTTL.
	defer func() {
		if !slices.ContainsFunc(tokens, func(t string) bool { return t != "" }) {
			return // no key reserved: no timer to start (a push without one is most)
		}
		settleCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), settle)
		defer cancel()
		each(len(reqs), parallel, func(i int) {
			if tokens[i] != "" {
				st.settle(settleCtx, &reqs[i], tokens[i], &out[i])
			}
		}, func(i int, v any) {
			st.logFailure(ctx, "panic while settling an idempotency key", "route", reqs[i].name, "panic", fmt.Sprint(v))
		})
	}()

	plans := make([]*plan, len(reqs))
	each(len(reqs), parallel, func(i int) {
		if !pending(i) {
			errs[i] = errAnswered
			return
		}
		plans[i], errs[i] = reqs[i].t.resolve(ctx, reqs[i].push)
	}, internal("resolve"))
	for i := range reqs {
		if out[i].status != 0 && errs[i] == nil {
			errs[i] = errAnswered // a panic answered it
		}
	}
	if len(reqs) == 1 {
		if errs[0] == nil {
			plans[0].res, errs[0] = st.pusher.run(ctx, plans[0])
		}
	} else {
		st.pusher.runBatch(ctx, plans, errs, parallel)
	}
	for i := range reqs {
		if pending(i) {
			out[i] = st.outcomeOf(ctx, &reqs[i], plans[i], errs[i])
		}
	}
	for i, j := range dupOf {
		switch {
		case j < 0:
		case reqs[i].fp != reqs[j].fp:
			out[i] = failed(http.StatusUnprocessableEntity, "Idempotency-Key: given in this request to another push of other parameters or another message")
		default:
			out[i] = out[j]
			out[i].replayed = out[j].status == http.StatusOK
		}
	}
	return out
}

// acceptEach validates n pushes with item and accepts the valid ones,
// answering each in order (a push that failed validation with 400, or 413
// when too large) and counting each under its route ("batch" when it
// named none). item returns its request's name as soon as it knows it.
func (st *Stage) acceptEach(ctx context.Context, n int, item func(i int) (pushRequest, error)) []outcome {
	out := make([]outcome, n)
	labels := make([]string, n)
	reqs := make([]pushRequest, 0, n)
	at := make([]int, 0, n) // reqs[j] is item at[j]
	for i := range n {
		req, err := item(i)
		labels[i] = strings.TrimPrefix(req.name, "push/")
		if labels[i] == "" {
			labels[i] = "batch"
		}
		var tooLarge *tooLargeError
		switch {
		case errors.As(err, &tooLarge):
			out[i] = failed(http.StatusRequestEntityTooLarge, err.Error())
		case err != nil:
			out[i] = failed(http.StatusBadRequest, err.Error())
		default:
			reqs = append(reqs, req)
			at = append(at, i)
		}
	}
	if len(reqs) > 0 {
		pctx, cancel, settle := st.pushBudget(ctx)
		for j, o := range st.accept(pctx, reqs, settle) {
			out[at[j]] = o
		}
		cancel()
	}
	if st.metrics != nil {
		for i, o := range out {
			st.metrics.Push(labels[i], o.status)
		}
	}
	return out
}

// errAnswered marks a request answered before it was resolved (by the
// idempotency store): runBatch skips it.
var errAnswered = errors.New("answered")

// reserve claims a request's idempotency key. A zero status means the
// request holds the key (token) and is to run.
func (st *Stage) reserve(ctx context.Context, r *pushRequest) (outcome, string) {
	e, err := st.replies.Reserve(ctx, r.storeKey(), r.fp)
	switch {
	case err != nil:
		st.logFailure(ctx, "idempotency store unavailable", "route", r.name, "correlation_id", r.push.CorrelationID, "err", err)
		return failed(http.StatusServiceUnavailable, "idempotency store unavailable, retry later"), ""
	case e.Fingerprint != r.fp:
		return failed(http.StatusUnprocessableEntity, "Idempotency-Key: already used for a request with other parameters or another message"), ""
	case e.State == idempotency.InFlight:
		return failed(http.StatusConflict, "Idempotency-Key: a request with this key is still being processed"), ""
	case e.State == idempotency.Done:
		// The store keeps the reply's data, not its envelope: a retry
		// is answered in the shape of the API it came by.
		return outcome{status: http.StatusOK, data: e.Reply, replayed: true}, ""
	}
	return outcome{}, e.Token
}

// settle stores a reserved request's reply, or frees its key when it
// failed so that a retry can run. The reply's JSON is kept in o for its
// answer, which then encodes it no second time.
func (st *Stage) settle(ctx context.Context, r *pushRequest, token string, o *outcome) {
	if o.status == http.StatusOK {
		if err := st.replies.Complete(ctx, r.storeKey(), token, o.body()); err != nil {
			st.logFailure(ctx, "remember idempotent reply", "route", r.name, "err", err)
		}
		return
	}
	if err := st.replies.Release(ctx, r.storeKey(), token); err != nil {
		st.logFailure(ctx, "release idempotency key", "route", r.name, "err", err)
	}
}

// outcomeOf answers a resolved and published push from its error.
func (st *Stage) outcomeOf(ctx context.Context, r *pushRequest, pl *plan, err error) outcome {
	var perr *paramError
	switch {
	case err == nil:
		return outcome{status: http.StatusOK, result: &pl.res}
	case errors.As(err, &perr):
		return failed(http.StatusBadRequest, perr.Error())
	case errors.Is(err, ErrBroker):
		st.logFailure(ctx, "push not accepted", "route", r.name, "correlation_id", r.push.CorrelationID, "err", err)
		if errors.Is(err, pipeline.ErrQueueFull) {
			return failed(http.StatusServiceUnavailable, "push queue full, retry later")
		}
		return failed(http.StatusServiceUnavailable, "broker unavailable, retry later")
	case errors.Is(err, ErrRegistry):
		st.logFailure(ctx, "push not resolved", "route", r.name, "correlation_id", r.push.CorrelationID, "err", err)
		return failed(http.StatusServiceUnavailable, "registry unavailable, retry later")
	case errors.Is(err, ErrHistory):
		st.logFailure(ctx, "push not positioned", "route", r.name, "correlation_id", r.push.CorrelationID, "err", err)
		return failed(http.StatusServiceUnavailable, "history unavailable, retry later")
	default:
		// Input is validated before it gets here: anything else is a bug,
		// and retrying will not help.
		st.logFailure(ctx, "push failed", "route", r.name, "correlation_id", r.push.CorrelationID, "err", err)
		return failed(http.StatusInternalServerError, "internal error (logged with correlation id "+r.push.CorrelationID+")")
	}
}

// each runs fn for 0..n-1, at most parallel at once; with parallel 1 (or
// n 1) one after another on the caller's goroutine, which a single push or
// in-process stores need (a goroutine per push only overlaps round trips).
// A panic in fn(i) is given to onPanic(i, value) instead of ending the
// process: a batch's pushes run on goroutines no server recovers.
func each(n, parallel int, fn func(i int), onPanic func(i int, v any)) {
	run := func(i int) {
		defer func() {
			if v := recover(); v != nil {
				onPanic(i, v)
			}
		}()
		fn(i)
	}
	if n == 1 || parallel <= 1 {
		for i := range n {
			run(i)
		}
		return
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, parallel)
	for i := range n {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			run(i)
		}()
	}
	wg.Wait()
}
